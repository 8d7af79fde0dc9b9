"""The receptive field by the lecture's formula, from the layers along a network's deepest path.

A layer with kernel k and dilation (atrous rate) a acts like a dense kernel of a(k - 1) + 1 taps; at a
jump j (input voxels between two neighbouring voxels of the layer's input) it widens the field by
(a(k - 1) + 1 - 1) x j, and a stride s multiplies the jump by s for the layers after it. An upsampling
step whose kernel equals its stride (transposed conv with kernel = stride, max-unpooling, nearest
upsampling) maps each output voxel to one input voxel: it divides the jump and adds nothing.

Per axis, in array order (z, y, x) or (y, x). Pure Python: planning uses it without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Layer:
    """One step of the deepest path: kernel and dilation per axis, then a stride (downsampling) or an
    upsampling factor (kernel = stride, applied before the kernel). None means 1 on every axis."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...] | None = None
    dilation: tuple[int, ...] | None = None
    upsample: tuple[int, ...] | None = None


def effective_kernel(kernel: int, dilation: int = 1) -> int:
    """Taps a dilated kernel spans: a(k - 1) + 1."""
    return dilation * (kernel - 1) + 1


def receptive_field(layers: Sequence[Layer], dim: int) -> tuple[int, ...]:
    """Receptive field in input voxels per axis of one output voxel after `layers`, in order.

    For a network whose output voxel depends on its position modulo the total stride (a U-Net), this is
    the mean field over one stride period when every strided axis has stride 2 and kernel 3 at its stage
    (see `autoseg.model.size.receptive_field`); tests compare it with gradients for every family.
    """
    ones = (1,) * dim
    field, jump = [1] * dim, [1] * dim
    for layer in layers:
        jump = [j // u for j, u in zip(jump, layer.upsample or ones)]
        taps = [effective_kernel(k, a) for k, a in zip(layer.kernel, layer.dilation or ones)]
        field = [f + (t - 1) * j for f, t, j in zip(field, taps, jump)]
        jump = [j * s for j, s in zip(jump, layer.stride or ones)]
    return tuple(field)
