"""SegNet and DeconvNet of a Topology (families `segnet`, `deconvnet`): conv stages with max pooling, a
decoder without skips that upsamples with the pooling indices (SegNet) or with learned weights (DeconvNet).

Tensors are (b, c, z, y, x) in 3D and (b, c, y, x) in 2D. Encoder stage s works at resolution level s:
stage s > 0 max-pools level s - 1 with kernel = stride = strides[s] (windows tile the map: no overlap, no
padding, the patch is divisible by the total stride), then runs its conv-norm-nonlin stack. Decoder level
l brings level l + 1 back to level l and runs its convs; its 1x1 head gives the logits of level l.

SegNet keeps the argmax of every pooling window (torch's `return_indices`: per (sample, channel), the flat
index of the max within the pre-pooling map) and its decoder max-unpools with them: each value goes back to
where its max came from, the other voxels of the window are 0. These are torch's own nn.MaxPoolNd and
nn.MaxUnpoolNd; torch's ONNX exporter (torch.export based, the default) exports them (MaxPool with its
Indices output, the unpooling as a ScatterND), the TorchScript exporter has no MaxUnpool.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoseg.model.blocks import ConvNormAct, ConvStack, conv_op
from autoseg.model.checks import check_input, check_topology
from autoseg.model.contract import Topology
from autoseg.model.unet import UPSAMPLING, init_weights

Ints = Sequence[int]


def max_pool(dim: int, stride: Ints, *, indices: bool) -> nn.Module:
    """Max pooling with kernel = stride: (b, c, *n) -> (b, c, *(n / stride)) [, argmax indices of that shape]."""
    op = nn.MaxPool3d if dim == 3 else nn.MaxPool2d
    return op(tuple(stride), stride=tuple(stride), return_indices=indices)


def max_unpool(dim: int, stride: Ints) -> nn.Module:
    """Max unpooling with kernel = stride: (values, indices) (b, c, *n) -> (b, c, *(n * stride))."""
    op = nn.MaxUnpool3d if dim == 3 else nn.MaxUnpool2d
    return op(tuple(stride), stride=tuple(stride))


def conv_chain(widths: Ints, kernel: Ints, topology: Topology) -> nn.Sequential:
    """One conv-norm-nonlin per consecutive pair of `widths`: (b, widths[0], *n) -> (b, widths[-1], *n)."""
    ops = {"dim": topology.dim, "norm": topology.norm, "nonlin": topology.nonlin}
    return nn.Sequential(*(ConvNormAct(a, b, kernel, **ops) for a, b in zip(widths[:-1], widths[1:])))


def narrowing(n_convs: int, first: int, inner: int, last: int) -> list[int]:
    """Channel widths of n convs: first -> inner -> ... -> inner -> last (one conv: first -> last)."""
    return [first] + [inner] * (n_convs - 1) + [last]


class PoolingEncoder(nn.Module):
    """Stage 0: convs on the input; stage s > 0: max pooling by strides[s], then convs (kernel_sizes[s]).

    forward: (b, c_in, *patch) -> (deepest map, [argmax indices of the pooling into level l + 1 for each l]
    with `indices`, else []). `widths[s]`: the channel widths of stage s's convs.
    """

    def __init__(self, topology: Topology, widths: Sequence[Ints], *, indices: bool) -> None:
        super().__init__()
        t = topology
        self.indices = indices
        self.pools = nn.ModuleList(max_pool(t.dim, t.strides[s], indices=indices) for s in range(1, t.n_stages))
        self.stages = nn.ModuleList(conv_chain(widths[s], t.kernel_sizes[s], t) for s in range(t.n_stages))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.stages[0](x)
        indices = []
        for pool, stage in zip(self.pools, self.stages[1:]):
            if self.indices:
                x, where = pool(x)
                indices.append(where)
            else:
                x = pool(x)
            x = stage(x)
        return x, indices


class UnpoolLevel(nn.Module):
    """SegNet decoder level l: max-unpool level l + 1 with the pooling's indices, then convs.

    forward(low (b, widths[0], *n), indices (b, widths[0], *n)) -> (b, widths[-1], *(n * strides[l + 1])).
    """

    def __init__(self, topology: Topology, level: int, widths: Ints) -> None:
        super().__init__()
        self.unpool = max_unpool(topology.dim, topology.strides[level + 1])
        self.convs = conv_chain(widths, topology.kernel_sizes[level], topology)

    def forward(self, low: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        return self.convs(self.unpool(low, indices))


class UpsampleLevel(nn.Module):
    """DeconvNet decoder level l: learned upsampling (topology.upsampling, kernel = stride) of level l + 1 to
    features[l], then convs. forward(low (b, features[l + 1], *n), None) -> (b, features[l], *(n * stride))."""

    def __init__(self, topology: Topology, level: int) -> None:
        super().__init__()
        t, features = topology, topology.features_per_stage
        self.up = UPSAMPLING.get(t.upsampling)(features[level + 1], features[level], t.strides[level + 1], dim=t.dim)
        self.convs = ConvStack(features[level], features[level], t.kernel_sizes[level],
                               n_convs=t.convs_per_decoder_stage[level], dim=t.dim, norm=t.norm, nonlin=t.nonlin)

    def forward(self, low: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        return self.convs(self.up(low))


class SegNet(nn.Module):
    """SegNet from a Topology. forward: (b, in_channels, *patch) -> logits (b, num_classes, *patch).

    With `self.deep_supervision` True (settable; starts as `topology.deep_supervision`) a list of
    n_stages - 1 logit maps, highest resolution first, map l of shape patch / cumulative stride of stages
    0..l. The patch must be divisible by `topology.total_stride`.
    """

    unpooling = True

    def __init__(self, topology: Topology, in_channels: int, num_classes: int) -> None:
        super().__init__()
        check_topology(topology, in_channels=in_channels, num_classes=num_classes, family=topology.architecture,
                       min_stages=2)
        self.topology, self.in_channels, self.num_classes = topology, in_channels, num_classes
        self.deep_supervision = topology.deep_supervision
        self.encoder = PoolingEncoder(topology, self.encoder_widths(in_channels), indices=self.unpooling)
        self.decoder = nn.ModuleList(self.decoder_level(level) for level in range(topology.n_stages - 1))
        self.output_heads = nn.ModuleList(
            conv_op(topology.dim)(self.level_width(level), num_classes, 1, bias=True)
            for level in range(topology.n_stages - 1))
        init_weights(self)

    def encoder_widths(self, in_channels: int) -> list[list[int]]:
        """Channel widths of each encoder stage's convs; SegNet's bottleneck narrows back to features[n - 2]."""
        t, f = self.topology, self.topology.features_per_stage
        widths = [narrowing(t.convs_per_stage[s], f[s - 1] if s else in_channels, f[s], f[s])
                  for s in range(t.n_stages)]
        widths[-1][-1] = f[-2]
        return widths

    def decoder_level(self, level: int) -> nn.Module:
        """Unpool, then convs at features[level] that narrow to features[level - 1] (level 0: features[0])."""
        t, f = self.topology, self.topology.features_per_stage
        return UnpoolLevel(t, level, narrowing(t.convs_per_decoder_stage[level], f[level], f[level],
                                               f[max(level - 1, 0)]))

    def level_width(self, level: int) -> int:
        """Channels of decoder level `level`'s output (its head's input)."""
        return self.topology.features_per_stage[max(level - 1, 0)]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_input(x, dim=self.topology.dim, in_channels=self.in_channels, stride=self.topology.total_stride)
        x, indices = self.encoder(x)
        outputs = []
        for level in range(len(self.decoder) - 1, -1, -1):
            x = self.decoder[level](x, indices[level] if indices else None)
            if self.deep_supervision or level == 0:
                outputs.append(self.output_heads[level](x))
        return outputs[::-1] if self.deep_supervision else outputs[0]


class DeconvNet(SegNet):
    """DeconvNet from a Topology: SegNet's encoder (pooling without indices) and a learned-upsampling
    decoder (`UpsampleLevel`); same forward and deep-supervision contract as `SegNet`."""

    unpooling = False

    def encoder_widths(self, in_channels: int) -> list[list[int]]:
        t, f = self.topology, self.topology.features_per_stage
        return [narrowing(t.convs_per_stage[s], f[s - 1] if s else in_channels, f[s], f[s])
                for s in range(t.n_stages)]

    def decoder_level(self, level: int) -> nn.Module:
        return UpsampleLevel(self.topology, level)

    def level_width(self, level: int) -> int:
        return self.topology.features_per_stage[level]
