"""`resenc`: the residual-encoder U-Net (nnU-Net's ResEnc presets, Isensee et al. 2024).

The idea it carries: a deeper encoder made trainable by residual blocks (He et al. 2016): each block adds
its input back to the output of two convs, so gradients reach early layers through the identity path and
stages can hold (1, 3, 4, 6, 6, ...) blocks. ResNet-D skips (average pooling, then a 1x1 conv where the
channels change). The decoder is the U-Net's with one conv per level; deep supervision as the U-Net.
Same stage plan (kernels, strides, features) as the U-Net; sizes measured by the generic estimator.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from autoseg.model.contract import Topology
from autoseg.model.families import NetworkFamily, register
from autoseg.model.networks.unet import decoder_path
from autoseg.model.receptive import Layer

#: Residual blocks per encoder stage (nnU-Net's ResEnc M/L/XL); later stages repeat the last count.
BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6)


def build(topology: Topology, in_channels: int, num_classes: int) -> Any:
    from autoseg.model.unet import UNet

    return UNet(topology, in_channels, num_classes)


def topology(stage_plan: Topology) -> Topology:
    n = stage_plan.n_stages
    blocks = tuple(BLOCKS_PER_STAGE[min(s, len(BLOCKS_PER_STAGE) - 1)] for s in range(n))
    return replace(stage_plan, convs_per_stage=blocks, convs_per_decoder_stage=(1,) * (n - 1))


def path(topology: Topology) -> list[Layer]:
    """The stem conv, both convs of every block (the first block of a stage strided), then the decoder."""
    layers = [Layer(topology.kernel_sizes[0])]
    for s in range(topology.n_stages):
        for block in range(topology.convs_per_stage[s]):
            layers.append(Layer(topology.kernel_sizes[s], stride=topology.strides[s] if block == 0 else None))
            layers.append(Layer(topology.kernel_sizes[s]))
    return layers + decoder_path(topology)


FAMILY = register(NetworkFamily(
    name="resenc",
    description="U-Net with a residual encoder: 1,3,4,6,6.. ResNet-D blocks per stage, 1-conv decoder (ResEnc)",
    build=build,
    topology=topology,
    path=path,
    architecture="resenc_unet",
))
