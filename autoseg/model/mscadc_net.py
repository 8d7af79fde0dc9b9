"""The multi-scale context aggregation network of a Topology (`autoseg.model.networks.mscadc` documents
the mapping and the rules).

Tensors are (b, c, z, y, x) in 3D and (b, c, y, x) in 2D; strides, dilations and rates per axis in array
order. The front-end is nnU-Net's plain encoder (`autoseg.model.unet.PlainEncoder`) on the strides the
network applies, its later stages switched to atrous as in DeepLab (`autoseg.model.deeplab_net.atrous`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoseg.model.blocks import NONLINS, conv_op
from autoseg.model.checks import check_topology
from autoseg.model.contract import Topology
from autoseg.model.deeplab_net import atrous, atrous_encoder, upsampling
from autoseg.model.fcn_net import SingleOutputNet
from autoseg.model.networks.mscadc import context_kernel, context_rates
from autoseg.model.unet import PlainEncoder, init_weights


class ContextLayer(nn.Module):
    """One context layer: a dilated conv (channels -> channels, bias) and the nonlinearity, no norm.
    (b, c, *n) -> (b, c, *n)."""

    def __init__(self, channels: int, kernel: Sequence[int], rate: Sequence[int], *, dim: int,
                 nonlin: str) -> None:
        super().__init__()
        self.conv = conv_op(dim)(channels, channels, tuple(kernel), padding=tuple(k // 2 for k in kernel),
                                 bias=True)
        atrous(self, rate)
        self.act = NONLINS.get(nonlin)(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))

    def identity_init(self) -> None:
        """The paper's identity init: weight[c, c, centre] = 1, every other weight and the bias 0."""
        weight = self.conv.weight
        centre = tuple(k // 2 for k in weight.shape[2:])
        with torch.no_grad():
            weight.zero_()
            weight[(slice(None), slice(None), *centre)].fill_diagonal_(1.0)  # (C, C) view of the centre taps
            self.conv.bias.zero_()


class ContextModule(nn.Sequential):
    """The basic context module: one ContextLayer per rate of `context_rates`, C channels throughout."""

    def __init__(self, topology: Topology, channels: int) -> None:
        kernel = context_kernel(topology)
        super().__init__(*(ContextLayer(channels, kernel, rate, dim=topology.dim, nonlin=topology.nonlin)
                           for rate in context_rates(topology)))

    def identity_init(self) -> None:
        for layer in self:
            layer.identity_init()


class MSCADC(SingleOutputNet):
    """Front-end, context module, 1x1 classifier, linear upsampling by the output stride. forward:
    (b, in_channels, *patch) -> logits (b, num_classes, *patch), patch divisible by the output stride
    (`atrous_plan`; planned patches are divisible by the plan's larger total stride)."""

    def __init__(self, topology: Topology, in_channels: int, num_classes: int) -> None:
        super().__init__()
        check_topology(topology, in_channels=in_channels, num_classes=num_classes, family=topology.architecture,
                       decoder=False)
        self.topology, self.in_channels, self.num_classes = topology, in_channels, num_classes
        self.frontend, self.output_stride = atrous_encoder(PlainEncoder, topology, in_channels)
        channels = topology.features_per_stage[-1]
        self.context = ContextModule(topology, channels)
        self.classifier = conv_op(topology.dim)(channels, num_classes, 1, bias=True)
        self.up = upsampling(self.output_stride, topology.dim)
        init_weights(self)
        self.context.identity_init()

    @property
    def output_heads(self) -> list[nn.Module]:
        """The classifier: its bias is the output's class prior (interpolation keeps constants)."""
        return [self.classifier]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, self.output_stride)
        return self.up(self.classifier(self.context(self.frontend(x)[-1])))
