"""FullNet of a Topology (`autoseg.model.networks.fullnet` documents the mapping and the rules).

Tensors are (b, c, z, y, x) in 3D and (b, c, y, x) in 2D; kernels and dilations per axis in array order.
Every map stays at the input resolution: convs use stride 1 and "same" padding dilation x (k // 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoseg.model.blocks import ConvNormAct, conv_op
from autoseg.model.checks import check_topology
from autoseg.model.contract import Topology
from autoseg.model.deeplab_net import atrous
from autoseg.model.fcn_net import SingleOutputNet
from autoseg.model.networks.fullnet import block_dilations, growth_rate
from autoseg.model.unet import init_weights


class DenseLayer(nn.Module):
    """One layer of a dense block: a dilated conv-norm-nonlin adds `growth` channels to its input.
    (b, c, *n) -> (b, c + growth, *n), the input's channels first. It returns the concatenation itself, so
    the size estimator counts that tensor (a dense block's memory grows with it, quadratically)."""

    def __init__(self, in_channels: int, growth: int, kernel: Sequence[int], dilation: Sequence[int], *,
                 topology: Topology) -> None:
        super().__init__()
        self.conv = ConvNormAct(in_channels, growth, kernel, dim=topology.dim, norm=topology.norm,
                                nonlin=topology.nonlin)
        atrous(self.conv, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.conv(x)), dim=1)


class DenseBlock(nn.Sequential):
    """`layers` DenseLayers at one dilation, then the 1x1 transition conv-norm-nonlin to `out_channels`.
    (b, c_in, *n) -> (b, out_channels, *n)."""

    def __init__(self, in_channels: int, out_channels: int, *, stage: int, dilation: Sequence[int],
                 topology: Topology) -> None:
        growth, kernel = growth_rate(topology, stage), topology.kernel_sizes[stage]
        layers: list[nn.Module] = [
            DenseLayer(in_channels + i * growth, growth, kernel, dilation, topology=topology)
            for i in range(topology.convs_per_stage[stage])
        ]
        total = in_channels + len(layers) * growth
        layers.append(ConvNormAct(total, out_channels, (1,) * topology.dim, dim=topology.dim, norm=topology.norm,
                                  nonlin=topology.nonlin))
        super().__init__(*layers)


class FullNet(SingleOutputNet):
    """Stem conv, one dilated dense block per plan stage, a 1x1 head. forward: (b, in_channels, *patch) ->
    logits (b, num_classes, *patch) for any patch (no stride; the plan's total stride only sizes patches)."""

    def __init__(self, topology: Topology, in_channels: int, num_classes: int) -> None:
        super().__init__()
        check_topology(topology, in_channels=in_channels, num_classes=num_classes, family=topology.architecture,
                       decoder=False)
        self.topology, self.in_channels, self.num_classes = topology, in_channels, num_classes
        widths = topology.features_per_stage
        ops = {"dim": topology.dim, "norm": topology.norm, "nonlin": topology.nonlin}
        self.stem = ConvNormAct(in_channels, widths[0], topology.kernel_sizes[0], **ops)
        self.blocks = nn.ModuleList(
            DenseBlock(widths[max(s - 1, 0)], widths[s], stage=s, dilation=dilation, topology=topology)
            for s, dilation in enumerate(block_dilations(topology))
        )
        self.head = conv_op(topology.dim)(widths[-1], num_classes, 1, bias=True)
        init_weights(self)

    @property
    def output_heads(self) -> list[nn.Module]:
        """The final 1x1 conv: its bias is the output's class prior."""
        return [self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, (1,) * self.topology.dim)
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
