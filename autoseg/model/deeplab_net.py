"""DeepLabv3 and v3+ of a Topology (`autoseg.model.networks.deeplab` documents the mapping and the rules).

Tensors are (b, c, z, y, x) in 3D and (b, c, y, x) in 2D; strides, dilations and rates per axis in array
order. The encoder is ResEnc's (`autoseg.model.unet.ResidualEncoder`) built on the strides the network
applies, with the convs of its later stages switched to atrous (`atrous`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from autoseg.model.blocks import NONLINS, ConvNormAct, ConvStack, conv_op
from autoseg.model.checks import check_topology
from autoseg.model.contract import Topology
from autoseg.model.fcn_net import SingleOutputNet
from autoseg.model.networks.deeplab import (
    DECODER_CONVS,
    aspp_rates,
    atrous_plan,
    low_level_stage,
    stage_dilations,
    stage_stride,
)
from autoseg.model.unet import ResidualEncoder, init_weights


def atrous(module: nn.Module, dilation: Sequence[int]) -> None:
    """Give every conv in `module` with a kernel > 1 the dilation `dilation` (1 on its 1-tap axes) and the
    padding that keeps the size (rate x (k // 2)): DeepLab's stride-free, dilated stage."""
    convs = (nn.Conv2d, nn.Conv3d)
    for conv in module.modules():
        if isinstance(conv, convs) and any(k > 1 for k in conv.kernel_size):
            conv.dilation = tuple(d if k > 1 else 1 for d, k in zip(dilation, conv.kernel_size))
            conv.padding = tuple(d * (k // 2) for d, k in zip(conv.dilation, conv.kernel_size))


def atrous_encoder(encoder: Callable[[Topology, int], nn.Module], topology: Topology, in_channels: int
                   ) -> tuple[nn.Module, tuple[int, ...]]:
    """`encoder(topology, in_channels)` built with the strides of `atrous_plan` (no striding past the output
    stride) and its later stages dilated instead (`stage_dilations`); returns it and the output stride per
    axis. The encoder must expose `stages` (one module per plan stage)."""
    strides, _, output_stride = atrous_plan(topology)
    built = encoder(replace(topology, strides=tuple(strides)), in_channels)
    for stage, dilation in zip(built.stages, stage_dilations(topology)):
        atrous(stage, dilation)
    return built, output_stride


def upsampling(factor: Sequence[int], dim: int) -> nn.Module:
    """(Bi/tri)linear upsampling by integer factors (align_corners=False, as the paper's resize), or the
    identity for factor 1 on every axis. (b, c, *n) -> (b, c, *(n * factor))."""
    if all(f == 1 for f in factor):
        return nn.Identity()
    mode = "trilinear" if dim == 3 else "bilinear"
    return nn.Upsample(scale_factor=tuple(float(f) for f in factor), mode=mode, align_corners=False)


class GlobalContext(nn.Module):
    """ASPP's image-level branch before the broadcast: (b, c_in, *n) -> (b, c_out, 1, ..., 1), the spatial
    mean through a 1x1 conv and the nonlinearity. No norm: an instance norm over one voxel is undefined.
    `global_context`: its output depends on every input voxel (a receptive-field measurement detaches it)."""

    global_context = True

    def __init__(self, in_channels: int, out_channels: int, *, dim: int, nonlin: str) -> None:
        super().__init__()
        self.conv = conv_op(dim)(in_channels, out_channels, 1, bias=True)
        self.act = NONLINS.get(nonlin)(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one atrous branch per rate (the deepest stage's kernel),
    the image-level branch broadcast to the map, concatenated and projected by a 1x1 conv.
    (b, c_in, *n) -> (b, c_out, *n)."""

    def __init__(self, topology: Topology, in_channels: int, out_channels: int) -> None:
        super().__init__()
        ops = {"dim": topology.dim, "norm": topology.norm, "nonlin": topology.nonlin}
        kernel = topology.kernel_sizes[-1]
        self.branches = nn.ModuleList([ConvNormAct(in_channels, out_channels, (1,) * topology.dim, **ops)])
        for rate in aspp_rates(topology):
            branch = ConvNormAct(in_channels, out_channels, kernel, **ops)
            atrous(branch, rate)
            self.branches.append(branch)
        self.image = GlobalContext(in_channels, out_channels, dim=topology.dim, nonlin=topology.nonlin)
        self.project = ConvNormAct((len(self.branches) + 1) * out_channels, out_channels, (1,) * topology.dim,
                                   **ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = self.image(x).expand(-1, -1, *x.shape[2:])
        return self.project(torch.cat([branch(x) for branch in self.branches] + [image], dim=1))


class Decoder(nn.Module):
    """v3+'s decoder: upsample the ASPP output to the low-level stage, concatenate that stage's features
    reduced by a 1x1 conv (3/16 of the ASPP width, the paper's 48 for 256), DECODER_CONVS convs.
    forward(aspp (b, c, *n), low (b, c_low, *(n * factor))) -> (b, c, *(n * factor))."""

    def __init__(self, topology: Topology, stage: int, channels: int, factor: Sequence[int]) -> None:
        super().__init__()
        ops = {"dim": topology.dim, "norm": topology.norm, "nonlin": topology.nonlin}
        reduced = max(1, channels * 3 // 16)
        self.up = upsampling(factor, topology.dim)
        self.reduce = ConvNormAct(topology.features_per_stage[stage], reduced, (1,) * topology.dim, **ops)
        self.convs = ConvStack(channels + reduced, channels, topology.kernel_sizes[stage], n_convs=DECODER_CONVS,
                               **ops)

    def forward(self, aspp: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat((self.up(aspp), self.reduce(low)), dim=1))


class DeepLab(SingleOutputNet):
    """DeepLabv3 (`decoder=False`) or v3+ (`decoder=True`). forward: (b, in_channels, *patch) -> logits
    (b, num_classes, *patch), patch divisible by the output stride (`atrous_plan`; planned patches are
    divisible by the plan's larger total stride). ASPP width: the deepest stage's features."""

    def __init__(self, topology: Topology, in_channels: int, num_classes: int, *, decoder: bool = False) -> None:
        super().__init__()
        check_topology(topology, in_channels=in_channels, num_classes=num_classes, family=topology.architecture,
                       decoder=False)
        self.topology, self.in_channels, self.num_classes = topology, in_channels, num_classes
        self.encoder, self.output_stride = atrous_encoder(ResidualEncoder, topology, in_channels)
        channels = topology.features_per_stage[-1]
        self.aspp = ASPP(topology, channels, channels)
        self.skip, final = None, self.output_stride
        if decoder:
            self.skip = low_level_stage(topology)
            final = stage_stride(topology, self.skip)
            factor = tuple(o // f for o, f in zip(self.output_stride, final))
            self.decoder = Decoder(topology, self.skip, channels, factor)
        self.classifier = conv_op(topology.dim)(channels, num_classes, 1, bias=True)
        self.up = upsampling(final, topology.dim)
        init_weights(self)

    @property
    def output_heads(self) -> list[nn.Module]:
        """The classifier: its bias is the output's class prior (interpolation keeps constants)."""
        return [self.classifier]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, self.output_stride)
        features = self.encoder(x)
        out = self.aspp(features[-1])
        if self.skip is not None:
            out = self.decoder(out, features[self.skip])
        return self.up(self.classifier(out))

