"""Network topology and patch size for one configuration (nnU-Net rules, reference §4.5).

Spacings are in mm, patches and shapes in voxels, per axis in array order after the plan's
transpose: (z, y, x) for 3D configurations, (y, x) for 2D ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from autoseg.model.contract import Topology

#: Edge (voxels) below which the bottleneck feature map may not shrink.
MIN_FEATURE_MAP_EDGE = 4
#: First-stage feature count; doubles per stage.
BASE_FEATURES = 32
MAX_FEATURES = {2: 512, 3: 320}
#: The initial patch has the volume of this edge to the power dim (before clipping).
INITIAL_PATCH_EDGE = {2: 2048, 3: 256}
#: The shrinking loop never reduces an axis below this edge: one pooling step must stay possible.
MIN_PATCH_EDGE = 2 * MIN_FEATURE_MAP_EDGE
CONVS_PER_STAGE = 2


@dataclass(frozen=True)
class PoolingPlan:
    """What the pooling rule decides for one patch: per-stage strides (stage 0 all ones) and
    kernels, the divisor per axis (2 ** poolings) and the patch padded up to it."""

    strides: tuple[tuple[int, ...], ...]
    kernels: tuple[tuple[int, ...], ...]
    divisor: tuple[int, ...]
    patch: tuple[int, ...]


def initial_patch(spacing: Sequence[float], median_shape: Sequence[float]) -> tuple[float, ...]:
    """A patch with aspect 1/spacing (isotropic in mm) and the volume of 256^3 (3D) / 2048^2 (2D),
    clipped to the median image shape (it can stay fractional when the median is)."""
    dim = len(spacing)
    inverse = [1.0 / s for s in spacing]
    scale = (INITIAL_PATCH_EDGE[dim] ** dim / math.prod(inverse)) ** (1.0 / dim)
    return tuple(min(float(round(i * scale)), float(m)) for i, m in zip(inverse, median_shape))


def pooling_plan(spacing: Sequence[float], patch: Sequence[float]) -> PoolingPlan:
    """Pool (stride 2) step by step while feature maps stay >= 2 x 4 voxels, only along axes whose
    current spacing is within 2x of the finest poolable axis (a lone axis needs >= 12 voxels).

    Kernels start at 1 per axis and become 3 for good once the axis' spacing is within 2x of the
    finest, so anisotropic data gets (1, 3, 3) at the top; the bottleneck kernel is always 3.
    """
    dim = len(spacing)
    current_spacing, size = list(spacing), [float(p) for p in patch]
    kernel, poolings = [1] * dim, [0] * dim
    strides: list[tuple[int, ...]] = [(1,) * dim]
    kernels: list[tuple[int, ...]] = []
    while True:
        axes = _poolable_axes(current_spacing, size)
        if not axes:
            break
        finest = min(current_spacing)
        kernel = [3 if k == 3 or current_spacing[d] / finest < 2 else 1 for d, k in enumerate(kernel)]
        kernels.append(tuple(kernel))
        strides.append(tuple(2 if d in axes else 1 for d in range(dim)))
        for d in axes:
            poolings[d] += 1
            current_spacing[d] *= 2
            size[d] = math.ceil(size[d] / 2)
    kernels.append((3,) * dim)
    divisor = tuple(2**p for p in poolings)
    padded = tuple(int(math.ceil(p / f) * f) for p, f in zip(patch, divisor))
    return PoolingPlan(tuple(strides), tuple(kernels), divisor, padded)


def _poolable_axes(spacing: Sequence[float], size: Sequence[float]) -> list[int]:
    axes = [d for d in range(len(size)) if size[d] >= 2 * MIN_FEATURE_MAP_EDGE]
    if not axes:
        return []
    finest = min(spacing[d] for d in axes)
    axes = [d for d in axes if spacing[d] / finest < 2]
    if len(axes) == 1 and size[axes[0]] < 3 * MIN_FEATURE_MAP_EDGE:
        return []
    return axes


def features_per_stage(n_stages: int, dim: int) -> tuple[int, ...]:
    """32 x 2^i per stage, capped at 320 (3D) or 512 (2D)."""
    return tuple(min(MAX_FEATURES[dim], BASE_FEATURES * 2**i) for i in range(n_stages))


def make_topology(pooling: PoolingPlan) -> Topology:
    """The plain U-Net for a pooling plan: 2 convs per encoder and decoder stage."""
    n_stages = len(pooling.strides)
    return Topology(
        dim=len(pooling.patch),
        features_per_stage=features_per_stage(n_stages, len(pooling.patch)),
        kernel_sizes=pooling.kernels,
        strides=pooling.strides,
        convs_per_stage=(CONVS_PER_STAGE,) * n_stages,
        convs_per_decoder_stage=(CONVS_PER_STAGE,) * (n_stages - 1),
    )


def shrink_step(pooling: PoolingPlan, spacing: Sequence[float], median_shape: Sequence[float]) -> PoolingPlan | None:
    """The pooling plan of the next smaller patch, or None when no axis may shrink.

    Shrinks the axis with the largest patch / median-shape ratio (ties: the last axis) by its
    divisor, where the divisor is recomputed for the tentatively shrunk patch so that valid sizes
    are not skipped (256 -> 224, not 192); the result is padded to its own divisor. Axes at
    MIN_PATCH_EDGE, and steps that padding would undo or that would grow another axis, are
    skipped in favour of the next axis (nnU-Net has no such guard).
    """
    patch = pooling.patch
    order = sorted(range(len(patch)), key=lambda d: (patch[d] / median_shape[d], d), reverse=True)
    for axis in order:
        if patch[axis] <= MIN_PATCH_EDGE:
            continue
        trial = list(patch)
        trial[axis] -= pooling.divisor[axis]
        step = pooling_plan(spacing, trial).divisor[axis]
        for size in (patch[axis] - step, patch[axis] - pooling.divisor[axis]):
            trial[axis] = max(size, MIN_PATCH_EDGE)
            smaller = pooling_plan(spacing, trial)
            shrinks = smaller.patch[axis] < patch[axis] and all(n <= p for n, p in zip(smaller.patch, patch))
            if shrinks and len(smaller.strides) >= 2:
                return smaller
    return None


def fit_patch(
    spacing: Sequence[float],
    median_shape: Sequence[float],
    fits: Callable[[Topology, tuple[int, ...]], bool],
    make: Callable[[Topology], Topology] = lambda stage_plan: stage_plan,
) -> tuple[Topology, tuple[int, ...], bool]:
    """Largest patch of the shrinking sequence whose network `fits` (batch 2 in the budget).

    `make` turns the plain U-Net of each pooling plan (the stage plan) into the network that is sized,
    e.g. a family's topology. Returns (topology, patch, True), or the smallest patch tried with False
    when none fits. A network needs two stages (one downsampling) to be a U-Net.
    """
    pooling = pooling_plan(spacing, initial_patch(spacing, median_shape))
    while True:
        topology = make(make_topology(pooling))
        if topology.n_stages >= 2 and fits(topology, pooling.patch):
            return topology, pooling.patch, True
        smaller = shrink_step(pooling, spacing, median_shape)
        if smaller is None:
            return topology, pooling.patch, False
        pooling = smaller
