"""The W-Net of a Topology (family `wnet`, `autoseg.model.networks.wnet` documents the mapping): two U-Nets
end to end, the second reading the image and the first one's class probabilities.

Tensors are (b, c, z, y, x) in 3D and (b, c, y, x) in 2D. Both U-Nets are `autoseg.model.unet.UNet`s of
the W-Net topology built as plain U-Nets (same kernels, strides, features, convs and upsampling step);
the first maps in_channels to num_classes logits, the second in_channels + num_classes to num_classes.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional as F

from autoseg.model.checks import check_input, check_topology
from autoseg.model.contract import Topology
from autoseg.model.unet import UNet

#: The architecture key the two U-Nets are built with (nnU-Net's plain encoder).
PLAIN_UNET = "plain_unet"


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Per-voxel class probabilities: softmax over the channels, a sigmoid for a single channel (whose
    softmax is the constant 1 and would pass nothing, gradient included, to the second U-Net)."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else F.softmax(logits, dim=1)


class WNet(nn.Module):
    """W-Net from a Topology. forward: (b, in_channels, *patch) -> the second U-Net's logits
    (b, num_classes, *patch); with `deep_supervision` True (settable, applies to both U-Nets) a list of
    2 (n_stages - 1) maps: the second U-Net's, highest resolution first, then the first's, map l of each
    of shape patch / (cumulative stride of stages 0..l). The patch must be divisible by `topology.total_stride`.
    """

    def __init__(self, topology: Topology, in_channels: int, num_classes: int) -> None:
        super().__init__()
        check_topology(topology, in_channels=in_channels, num_classes=num_classes, family="W-Net", min_stages=2)
        self.topology, self.in_channels, self.num_classes = topology, in_channels, num_classes
        unet = replace(topology, architecture=PLAIN_UNET)
        self.first = UNet(unet, in_channels, num_classes)
        self.second = UNet(unet, in_channels + num_classes, num_classes)
        self.deep_supervision = topology.deep_supervision

    @property
    def deep_supervision(self) -> bool:
        return self.second.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self.first.deep_supervision = self.second.deep_supervision = bool(value)

    @property
    def output_heads(self) -> list[nn.Module]:
        """The second U-Net's heads (the final prediction's), highest resolution first, then the first's."""
        return [*self.second.output_heads, *self.first.output_heads]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_input(x, dim=self.topology.dim, in_channels=self.in_channels, stride=self.topology.total_stride)
        first = self.first(x)
        coarse = first[0] if self.deep_supervision else first
        second = self.second(torch.cat((x, probabilities(coarse)), dim=1))
        if not self.deep_supervision:
            return second
        return [*second, *first]
