"""Dimension-agnostic network building blocks: conv-norm-nonlin, stacks of them, residual blocks.

Every block works for 2D (b, c, y, x) and 3D (b, c, z, y, x) tensors; the torch op classes are
picked from `dim` so one implementation serves both. Kernel sizes and strides are per axis in
array order. Convs use "same" padding (k // 2, odd kernels), so a conv with stride s turns an
edge of n voxels into ceil(n / s), exactly what the size formulas in `autoseg.model.size` assume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from autoseg.registry import Registry

Ints = Sequence[int]

#: Normalisations by key: (channels, dim) -> module. eps 1e-5 and a learned scale and shift, so
#: each norm has 2 x channels parameters (what `autoseg.model.size` counts).
NORMS: Registry[Callable[[int, int], nn.Module]] = Registry("normalization")
#: Nonlinearities by key: (channels) -> module (a learned one, PReLU, has one parameter per channel).
NONLINS: Registry[Callable[[int], nn.Module]] = Registry("nonlinearity")


@NORMS.register("instance")
def _instance_norm(channels: int, dim: int) -> nn.Module:
    op = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
    return op(channels, eps=1e-5, affine=True)


@NORMS.register("batch")
def _batch_norm(channels: int, dim: int) -> nn.Module:
    op = nn.BatchNorm3d if dim == 3 else nn.BatchNorm2d
    return op(channels, eps=1e-5, affine=True)


@NONLINS.register("leaky_relu")
def _leaky_relu(channels: int) -> nn.Module:
    return nn.LeakyReLU(negative_slope=1e-2, inplace=True)


@NONLINS.register("relu")
def _relu(channels: int) -> nn.Module:
    return nn.ReLU(inplace=True)


@NONLINS.register("prelu")
def _prelu(channels: int) -> nn.Module:
    """One learned negative slope per channel, starting at 0.25 (He et al. 2015; V-Net's and ENet's)."""
    return nn.PReLU(channels, init=0.25)


def conv_op(dim: int) -> type[nn.Module]:
    """nn.Conv2d or nn.Conv3d."""
    return {2: nn.Conv2d, 3: nn.Conv3d}[_check_dim(dim)]


def transposed_conv_op(dim: int) -> type[nn.Module]:
    """nn.ConvTranspose2d or nn.ConvTranspose3d."""
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[_check_dim(dim)]


def dropout_op(dim: int) -> type[nn.Module]:
    """Channel dropout (whole feature maps), nn.Dropout2d or nn.Dropout3d."""
    return {2: nn.Dropout2d, 3: nn.Dropout3d}[_check_dim(dim)]


def avg_pool_op(dim: int) -> type[nn.Module]:
    """nn.AvgPool2d or nn.AvgPool3d."""
    return {2: nn.AvgPool2d, 3: nn.AvgPool3d}[_check_dim(dim)]


def _check_dim(dim: int) -> int:
    if dim not in (2, 3):
        raise ValueError(f"networks are 2D or 3D, not {dim}D")
    return dim


def same_padding(kernel_size: Ints) -> tuple[int, ...]:
    """k // 2 per axis: keeps the size at stride 1 (odd kernels), ceil(n / s) at stride s."""
    return tuple(k // 2 for k in kernel_size)


class ConvNormAct(nn.Module):
    """conv (bias) -> [channel dropout] -> norm -> [nonlin]: (b, c_in, *n) -> (b, c_out, *ceil(n / stride)).

    `act=False` leaves out the nonlinearity (the second conv of a residual block adds its skip first).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Ints,
        *,
        stride: Ints | None = None,
        dim: int,
        norm: str = "instance",
        nonlin: str = "leaky_relu",
        dropout: float = 0.0,
        act: bool = True,
    ) -> None:
        super().__init__()
        stride = tuple(stride) if stride is not None else (1,) * dim
        self.conv = conv_op(dim)(
            in_channels, out_channels, tuple(kernel_size), stride=stride, padding=same_padding(kernel_size), bias=True
        )
        self.dropout = dropout_op(dim)(dropout) if dropout > 0 else nn.Identity()
        self.norm = NORMS.get(norm)(out_channels, dim)
        self.act = NONLINS.get(nonlin)(out_channels) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.dropout(self.conv(x))))


class ConvStack(nn.Sequential):
    """`n_convs` ConvNormAct blocks; the first maps in -> out channels and carries the stride.

    This is one plain encoder stage (strided-conv downsampling) or one decoder stage (stride 1).
    (b, c_in, *n) -> (b, c_out, *ceil(n / stride)).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Ints,
        *,
        n_convs: int,
        stride: Ints | None = None,
        dim: int,
        norm: str = "instance",
        nonlin: str = "leaky_relu",
        dropout: float = 0.0,
    ) -> None:
        if n_convs < 1:
            raise ValueError(f"a conv stack needs at least one conv, got {n_convs}")
        blocks = [
            ConvNormAct(
                in_channels if i == 0 else out_channels,
                out_channels,
                kernel_size,
                stride=stride if i == 0 else None,
                dim=dim,
                norm=norm,
                nonlin=nonlin,
                dropout=dropout,
            )
            for i in range(n_convs)
        ]
        super().__init__(*blocks)


class BasicBlock(nn.Module):
    """Residual block, ResNet-D style: nonlin(norm(conv(ConvNormAct(x))) + skip(x)).

    The first conv carries the stride. The skip downsamples by average pooling (kernel = stride)
    rather than a strided 1x1 conv, which would drop 3 of 4 (2D) or 7 of 8 (3D) voxels, and
    projects with a 1x1 conv + norm only when the channel count changes.
    (b, c_in, *n) -> (b, c_out, *ceil(n / stride)).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Ints,
        *,
        stride: Ints | None = None,
        dim: int,
        norm: str = "instance",
        nonlin: str = "leaky_relu",
    ) -> None:
        super().__init__()
        stride = tuple(stride) if stride is not None else (1,) * dim
        common = {"dim": dim, "norm": norm, "nonlin": nonlin}
        self.conv1 = ConvNormAct(in_channels, out_channels, kernel_size, stride=stride, **common)
        self.conv2 = ConvNormAct(out_channels, out_channels, kernel_size, act=False, **common)
        skip: list[nn.Module] = []
        if any(s != 1 for s in stride):
            # ceil_mode matches the conv's ceil(n / s) on edges that the stride does not divide
            skip.append(avg_pool_op(dim)(kernel_size=stride, stride=stride, ceil_mode=True))
        if in_channels != out_channels:
            skip.append(ConvNormAct(in_channels, out_channels, (1,) * dim, act=False, **common))
        self.skip = nn.Sequential(*skip) if skip else nn.Identity()
        self.act = NONLINS.get(nonlin)(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))

    def zero_init_last_norm(self) -> None:
        """Start as (almost) the identity: the residual branch outputs 0 until it learns otherwise."""
        norm = self.conv2.norm
        if getattr(norm, "weight", None) is not None:
            nn.init.zeros_(norm.weight)
            nn.init.zeros_(norm.bias)


class ResidualStack(nn.Sequential):
    """`n_blocks` BasicBlocks, the first carrying the stride and the channel change: one ResEnc stage."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Ints,
        *,
        n_blocks: int,
        stride: Ints | None = None,
        dim: int,
        norm: str = "instance",
        nonlin: str = "leaky_relu",
    ) -> None:
        if n_blocks < 1:
            raise ValueError(f"a residual stage needs at least one block, got {n_blocks}")
        blocks = [
            BasicBlock(
                in_channels if i == 0 else out_channels,
                out_channels,
                kernel_size,
                stride=stride if i == 0 else None,
                dim=dim,
                norm=norm,
                nonlin=nonlin,
            )
            for i in range(n_blocks)
        ]
        super().__init__(*blocks)


def pixel_shuffle(x: torch.Tensor, stride: Ints) -> torch.Tensor:
    """Sub-pixel rearrangement for any dim and per-axis stride: (b, c * prod(s), *n) -> (b, c, *(n * s)).

    Channel c * prod(s) + offset feeds output position n * s + offset, with the offset's axes in
    row-major order; for 2D with equal strides this is exactly torch's nn.PixelShuffle (which is
    2D only). Uses reshape/permute (no .view), so channels_last inputs work; the output keeps
    the input's memory format so the following convs stay in it.
    """
    stride = tuple(int(s) for s in stride)
    dim, taps = len(stride), math.prod(stride)
    b, c_in, *spatial = x.shape
    if len(spatial) != dim or c_in % taps:
        raise ValueError(f"cannot shuffle {tuple(x.shape)} by stride {stride}")
    split = x.reshape(b, c_in // taps, *stride, *spatial)
    # (b, c, s_0 .. s_d-1, n_0 .. n_d-1) -> (b, c, n_0, s_0, n_1, s_1, ...)
    order = [0, 1] + [i for axis in range(dim) for i in (2 + dim + axis, 2 + axis)]
    out = split.permute(order).reshape(b, c_in // taps, *(n * s for n, s in zip(spatial, stride)))
    return out.contiguous(memory_format=_memory_format(x))


def pixel_unshuffle(x: torch.Tensor, stride: Ints) -> torch.Tensor:
    """Inverse of `pixel_shuffle`: (b, c, *(n * s)) -> (b, c * prod(s), *n)."""
    stride = tuple(int(s) for s in stride)
    dim = len(stride)
    b, c, *spatial = x.shape
    if len(spatial) != dim or any(n % s for n, s in zip(spatial, stride)):
        raise ValueError(f"cannot unshuffle {tuple(x.shape)} by stride {stride}")
    low = [n // s for n, s in zip(spatial, stride)]
    split = x.reshape(b, c, *(v for pair in zip(low, stride) for v in pair))
    # (b, c, n_0, s_0, n_1, s_1, ...) -> (b, c, s_0 .. s_d-1, n_0 .. n_d-1)
    order = [0, 1] + [3 + 2 * axis for axis in range(dim)] + [2 + 2 * axis for axis in range(dim)]
    out = split.permute(order).reshape(b, c * math.prod(stride), *low)
    return out.contiguous(memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last(_3d) when x is stored that way, else contiguous."""
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format
