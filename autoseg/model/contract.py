"""Topology: the network's shape as the planner decides it and the trainer builds it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    """A network described stage by stage, highest resolution first.

    kernel_sizes[s] and strides[s] are per axis in array order; strides[0] is all ones
    (stage 0 does not downsample). `architecture` is the key of the network family that builds it
    (`autoseg.model.families`: plain_unet = unet, resenc_unet = resenc) and `upsampling` a registry key.
    """

    dim: int
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    convs_per_stage: tuple[int, ...]
    convs_per_decoder_stage: tuple[int, ...]
    architecture: str = "plain_unet"
    upsampling: str = "transposed_conv"
    norm: str = "instance"
    nonlin: str = "leaky_relu"
    deep_supervision: bool = True

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)

    @property
    def total_stride(self) -> tuple[int, ...]:
        """Product of strides per axis: the patch must be divisible by it."""
        total = [1] * self.dim
        for stride in self.strides:
            total = [t * s for t, s in zip(total, stride)]
        return tuple(total)
