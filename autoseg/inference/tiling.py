"""Where the sliding window's tiles go and how much each voxel of a tile counts (pure numpy).

Tiles overlap by (1 - step) of the patch; the first tile starts at 0 and the last ends at the
border, the rest are spread evenly between them, so every voxel is covered and no tile hangs out.
A Gaussian importance map down-weights tile borders, where the network sees least context.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

#: nnU-Net's choices: sigma = 1/8 of the patch, and the border weight floored so no voxel gets weight 0.
SIGMA_SCALE = 1.0 / 8


def tile_starts(size: int, patch: int, step: float) -> list[int]:
    """Start offsets along one axis: tiles of `patch` voxels at most `step * patch` apart, covering 0..size."""
    if patch > size:
        raise ValueError(f"patch {patch} is larger than the axis ({size}); pad the volume first")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    if size == patch:
        return [0]
    count = math.ceil((size - patch) / max(step * patch, 1.0)) + 1  # at least 1 voxel apart (2d slices)
    spacing = (size - patch) / (count - 1)
    return [round(i * spacing) for i in range(count)]


def tile_boxes(shape: Sequence[int], patch: Sequence[int], step: float) -> list[tuple[slice, ...]]:
    """Every tile of a volume `shape` (spatial axes only) as a tuple of slices, in C order."""
    starts = [tile_starts(int(s), int(p), step) for s, p in zip(shape, patch)]
    return [tuple(slice(b, b + int(p)) for b, p in zip(corner, patch)) for corner in itertools.product(*starts)]


def gaussian_axes(patch: Sequence[int], sigma_scale: float = SIGMA_SCALE) -> list[np.ndarray]:
    """The 1D factors of the importance map, each peaking at 1: their outer product is the map."""
    axes = []
    for size in patch:
        centre, sigma = (size - 1) / 2, max(size * sigma_scale, 1e-6)
        axis = np.exp(-0.5 * ((np.arange(size) - centre) / sigma) ** 2)
        axes.append(axis / axis.max())
    return axes


def gaussian_importance(patch: Sequence[int], sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
    """A separable Gaussian over the patch, peak 1 at the centre, float32, never exactly 0."""
    weights = np.ones((), dtype=np.float64)
    for axis in gaussian_axes(patch, sigma_scale):
        weights = np.multiply.outer(weights, axis)
    floor = weights[weights > 0].min()
    return np.maximum(weights, floor).astype(np.float32)


def weight_sums(shape: Sequence[int], patch: Sequence[int], step: float, axes: Sequence[np.ndarray]
                ) -> list[np.ndarray]:
    """Per axis, the sum of the 1D weights of every tile covering each position.

    Tiles form a grid and the weights are separable, so the summed weight of a voxel is the outer
    product of these: the sliding window divides by them instead of storing a full-size weight map.
    """
    sums = []
    for size, p, axis in zip(shape, patch, axes):
        total = np.zeros(int(size), dtype=np.float64)
        for start in tile_starts(int(size), int(p), step):
            total[start:start + int(p)] += axis
        sums.append(total)
    return sums


def padding_for(shape: Sequence[int], patch: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(before, after) padding per axis so every axis is at least the patch, split evenly."""
    pads = []
    for size, p in zip(shape, patch):
        missing = max(int(p) - int(size), 0)
        pads.append((missing // 2, missing - missing // 2))
    return tuple(pads)


def pad_to_patch(data: np.ndarray, patch: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Zero-pad the trailing spatial axes of `data` up to the patch; returns it and the slices that undo it."""
    spatial = len(patch)
    pads = padding_for(data.shape[-spatial:], patch)
    if not any(before or after for before, after in pads):
        return data, tuple(slice(None) for _ in range(spatial))
    padded = np.pad(data, [(0, 0)] * (data.ndim - spatial) + list(pads), mode="constant")
    inner = tuple(slice(before, before + size) for (before, _), size in zip(pads, data.shape[-spatial:]))
    return padded, inner


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the mirroring axes (the empty one first): 2^k flips for test-time augmentation."""
    axes = tuple(axes)
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]
