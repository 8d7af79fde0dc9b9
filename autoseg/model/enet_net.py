"""The ENet of a Topology (family `enet`, `autoseg.model.networks.enet`, which gives the layout of blocks).

Tensors are (b, c, z, y, x) in 3D and (b, c, y, x) in 2D; level l is the resolution after strides[0..l].
Every block but the initial one is a bottleneck: a main branch (identity; max pooling when downsampling,
unpooling when upsampling; zero channels appended when widening, as the paper does) plus a bottleneck
branch (1x1 reduce to a quarter of the wider side, the spatial conv(s), 1x1 expand, spatial dropout), added
and passed through the nonlinearity. Every conv is followed by topology.norm and the nonlinearity (PReLU
for the `prelu` key, one slope per channel) and has no bias (the norm's shift replaces it), except the final
transposed conv, which is the head. Pooling indices are torch's (nn.MaxPoolNd(return_indices=True)), each
used once by the matching nn.MaxUnpoolNd; see `autoseg.model.segnet_net` for their ONNX export.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from autoseg.model.blocks import NONLINS, NORMS, conv_op, dropout_op, same_padding, transposed_conv_op
from autoseg.model.checks import check_input
from autoseg.model.contract import Topology
from autoseg.model.networks.enet import Step, asymmetric_kernels, covering_kernel, dilation, layout
from autoseg.model.segnet_net import max_pool, max_unpool
from autoseg.model.unet import init_weights

Ints = Sequence[int]


def norm_act(channels: int, topology: Topology) -> nn.Sequential:
    """topology.norm then the nonlinearity: elementwise on (b, channels, *n)."""
    return nn.Sequential(NORMS.get(topology.norm)(channels, topology.dim), NONLINS.get(topology.nonlin)(channels))


def conv(in_channels: int, out_channels: int, kernel: Ints, topology: Topology, *, stride: Ints | None = None,
         rate: Ints | None = None) -> nn.Module:
    """Bias-free conv with "same" padding (dilated: rate x k // 2; none for kernel = stride, whose windows
    tile the map): (b, c_in, *n) -> (b, c_out, *(n / stride))."""
    ones = (1,) * topology.dim
    rate = tuple(rate or ones)
    tiles = stride is not None and tuple(kernel) == tuple(stride)
    padding = (0,) * topology.dim if tiles else tuple(r * p for r, p in zip(rate, same_padding(kernel)))
    return conv_op(topology.dim)(in_channels, out_channels, tuple(kernel), stride=tuple(stride or ones),
                                 padding=padding, dilation=rate, bias=False)


def widen(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Append zero channels up to `channels`: ENet's main branch when a block widens."""
    extra = channels - x.shape[1]
    return F.pad(x, (0, 0) * (x.ndim - 2) + (0, extra)) if extra else x


class InitialBlock(nn.Module):
    """conv (covering kernel, stride) to width - c_in channels next to a max pooling of the input (kernel =
    stride), concatenated, norm, nonlin: (b, c_in, *n) -> (b, width, *(n / stride)). An input of more than
    width / 2 channels (a cascade stage with many classes) gets the conv alone, to all `width` channels."""

    def __init__(self, in_channels: int, width: int, topology: Topology) -> None:
        super().__init__()
        kernel, stride = covering_kernel(topology.kernel_sizes[1], topology.strides[1]), topology.strides[1]
        pooled = 2 * in_channels <= width
        self.conv = conv(in_channels, width - in_channels if pooled else width, kernel, topology, stride=stride)
        self.pool = max_pool(topology.dim, stride, indices=False) if pooled else None
        self.act = norm_act(width, topology)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.act(torch.cat((y, self.pool(x)), dim=1) if self.pool is not None else y)


class Bottleneck(nn.Module):
    """Regular, dilated or asymmetric bottleneck: act(widen(x) + branch(x)), (b, c_in, *n) -> (b, c_out, *n).

    The branch: 1x1 reduce, the spatial conv (the level's kernel; dilated at `step.rate`; or one 1D conv
    per axis in sequence, norm and nonlin after the last), 1x1 expand, spatial dropout.
    """

    def __init__(self, in_channels: int, step: Step, topology: Topology) -> None:
        super().__init__()
        inner, kernel = max(max(in_channels, step.width) // 4, 1), topology.kernel_sizes[step.level]
        if step.kind == "asymmetric":
            spatial = [conv(inner, inner, k, topology) for k in asymmetric_kernels(kernel)]
        else:
            rate = dilation(kernel, step.rate if step.kind == "dilated" else 1)
            spatial = [conv(inner, inner, kernel, topology, rate=rate)]
        self.width = step.width
        self.branch = nn.Sequential(
            conv(in_channels, inner, (1,) * topology.dim, topology), norm_act(inner, topology),
            *spatial, norm_act(inner, topology),
            conv(inner, step.width, (1,) * topology.dim, topology), norm_act(step.width, topology),
            dropout_op(topology.dim)(step.dropout))
        self.act = NONLINS.get(topology.nonlin)(step.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(widen(x, self.width) + self.branch(x))


class DownBottleneck(nn.Module):
    """Downsampling bottleneck into level l: main = max pooling (kernel = stride, indices kept), widened;
    branch = conv of kernel = stride (and stride), the level's conv, 1x1 expand, spatial dropout.

    forward: (b, c_in, *n) -> ((b, c_out, *(n / stride)), indices (b, c_in, *(n / stride))).
    """

    def __init__(self, in_channels: int, step: Step, topology: Topology) -> None:
        super().__init__()
        inner, stride = max(max(in_channels, step.width) // 4, 1), topology.strides[step.level]
        self.width = step.width
        self.pool = max_pool(topology.dim, stride, indices=True)
        self.branch = nn.Sequential(
            conv(in_channels, inner, stride, topology, stride=stride), norm_act(inner, topology),
            conv(inner, inner, topology.kernel_sizes[step.level], topology), norm_act(inner, topology),
            conv(inner, step.width, (1,) * topology.dim, topology), norm_act(step.width, topology),
            dropout_op(topology.dim)(step.dropout))
        self.act = NONLINS.get(topology.nonlin)(step.width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, indices = self.pool(x)
        return self.act(widen(pooled, self.width) + self.branch(x)), indices


class UpBottleneck(nn.Module):
    """Upsampling bottleneck to level l: main = 1x1 conv to c_out and norm, then max unpooling with the
    indices of the downsampling into level l + 1; branch = 1x1 reduce, transposed conv (covering kernel,
    stride), 1x1 expand, spatial dropout.

    forward(x (b, c_in, *n), indices (b, c_out, *n)) -> (b, c_out, *(n * stride)).
    """

    def __init__(self, in_channels: int, step: Step, topology: Topology) -> None:
        super().__init__()
        dim, stride = topology.dim, topology.strides[step.level + 1]
        inner = max(max(in_channels, step.width) // 4, 1)
        kernel = covering_kernel(topology.kernel_sizes[step.level], stride)
        self.main = nn.Sequential(conv(in_channels, step.width, (1,) * dim, topology),
                                  NORMS.get(topology.norm)(step.width, dim))
        self.unpool = max_unpool(dim, stride)
        up = transposed_conv_op(dim)(inner, inner, kernel, stride=tuple(stride), padding=same_padding(kernel),
                                     output_padding=tuple(s - 1 for s in stride), bias=False)
        self.branch = nn.Sequential(
            conv(in_channels, inner, (1,) * dim, topology), norm_act(inner, topology),
            up, norm_act(inner, topology),
            conv(inner, step.width, (1,) * dim, topology), norm_act(step.width, topology),
            dropout_op(dim)(step.dropout))
        self.act = NONLINS.get(topology.nonlin)(step.width)

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.act(self.unpool(self.main(x), indices) + self.branch(x))


class ENet(nn.Module):
    """ENet from a Topology: (b, in_channels, *patch) -> logits (b, num_classes, *patch), patch divisible
    by `topology.total_stride`. A single output: `deep_supervision` stays False (set True, it is ignored);
    `output_heads` holds the final transposed conv (kernel = stride), whose bias is the output's prior.
    """

    def __init__(self, topology: Topology, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.topology, self.in_channels, self.num_classes = topology, in_channels, num_classes
        self.deep_supervision = False
        self.steps = tuple(layout(topology))
        blocks, channels = [], in_channels
        for step in self.steps[:-1]:
            blocks.append(_BLOCKS[step.kind](channels, step, topology))
            channels = step.width
        self.blocks = nn.ModuleList(blocks)
        stride = tuple(topology.strides[1])
        self.output_heads = nn.ModuleList([transposed_conv_op(topology.dim)(channels, num_classes, stride,
                                                                           stride=stride, bias=True)])
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, dim=self.topology.dim, in_channels=self.in_channels, stride=self.topology.total_stride)
        indices = []
        for step, block in zip(self.steps, self.blocks):
            if step.kind == "down":
                x, where = block(x)
                indices.append(where)
            elif step.kind == "up":
                x = block(x, indices.pop())
            else:
                x = block(x)
        return self.output_heads[0](x)


_BLOCKS = {"initial": lambda c, step, t: InitialBlock(c, step.width, t), "down": DownBottleneck,
           "up": UpBottleneck, "regular": Bottleneck, "dilated": Bottleneck, "asymmetric": Bottleneck}
