"""What the sliding window blends: the logits, or each network's features before its linear output head.

A network whose output is a 1x1 convolution of its last feature map (`linear_output_head`, e.g. the
U-Net's) gives logits = W f + b per voxel. Blending tiles is a weighted mean with weights that sum to
1 per voxel, and so is the mean over mirrored copies, so the blended logits are W (blended f) + b: the
window may blend the features and apply the head once per finished row. That pays when the features
are fewer than the classes (32 or fewer against a whole-body CT's 105): the open rows of the window
then hold the features, and the memory no longer grows with the class count. The mean over several
networks (folds) keeps one feature block per network. Equal to blending the logits up to float32
rounding; with fewer classes than features nothing changes (logits are blended, bit for bit as before).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

_POINTWISE = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class BlendedOutputs:
    """`channels` blended per voxel and how they become logits (`to_logits`)."""

    def __init__(self, networks: Sequence[nn.Module], num_classes: int) -> None:
        self.networks, self.num_classes = list(networks), num_classes
        heads = [getattr(network, "linear_output_head", None) for network in networks]
        pointwise = all(isinstance(head, _POINTWISE) and set(head.kernel_size) == {1} and head.groups == 1
                        and head.out_channels == num_classes for head in heads)
        features = sum(head.in_channels for head in heads) if pointwise else num_classes
        #: the heads applied after blending, or None: the logits themselves are blended
        self.heads: list[nn.Module] | None = heads if pointwise and features < num_classes else None  # type: ignore
        self.channels = features if self.heads else num_classes

    @property
    def per_network(self) -> bool:
        return self.heads is not None

    @contextmanager
    def features_mode(self) -> Iterator[None]:
        """While it is open, networks whose head is applied later return their features."""
        if self.heads is None:
            yield
            return
        for network in self.networks:
            network.features_only = True
        try:
            yield
        finally:
            for network in self.networks:
                network.features_only = False

    def to_logits(self, block: torch.Tensor) -> torch.Tensor:
        """Blended channels (channels, rows, ...) -> mean logits (num_classes, rows, ...) float32; a 2d
        network's rows are the slices of a volume."""
        if self.heads is None:
            return block
        total, first = None, 0
        for head in self.heads:
            count = head.in_channels
            weight = next(head.parameters())
            features = block[first:first + count].to(weight.device, weight.dtype)
            if features.ndim == weight.ndim:  # a 2d head on a volume's rows: the rows are its batch
                out = head(features.transpose(0, 1)).transpose(0, 1)
            else:
                out = head(features[None])[0]
            out = out.to(block.device, torch.float32)
            total = out if total is None else total.add_(out)
            first += count
        assert total is not None
        return total.div_(len(self.heads))
