"""Resampling of images, label maps and probabilities onto a new voxel grid (CPU, numpy/scipy only).

Arrays are (c, z, y, x) (labels may also be (z, y, x)); shapes and spacings (mm) follow the array's
spatial axis order, and `separate_axis` is a spatial axis index (0 = z). The results reproduce
nnU-Net v2's resampling (reference/nnunet-v2.md §5.3):

- images: skimage's order-3 `resize(mode='edge', anti_aliasing=False)` (= `scipy.ndimage.zoom`,
  grid_mode, mode 'nearest'), clipped to the input's range, within float32 rounding;
- labels: each label resized as a binary mask with linear interpolation and set where >= 0.5, labels
  in ascending order so a higher label overwrites a lower one, 0 where none reaches 0.5 -- bit for bit;
- "separate z" for anisotropic data: in-plane interpolation slice by slice (images clipped per slice),
  then `order_z` along the coarse axis (0 = nearest neighbour).

Why it is fast: a spline resize is a tensor product, so it is done one axis at a time. Along one axis
the prefilter (edge padding + `spline_filter1d`) and the tap weights combine into one small
(n_out, n_in) matrix, numerically banded; it is applied in blocks of output rows with BLAS matmuls in
float32, the axis that shrinks most first and unchanged axes skipped. Labels need the per-label
arithmetic only where the interpolation cell mixes labels; elsewhere the output copies the label.
Memory is the case's input and output plus one or two float32 intermediates of one channel.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from autoseg.errors import SettingsError

logger = logging.getLogger("autoseg.preprocessing")

_SPLINE_PAD = 12  # edge voxels scipy pads before the spline prefilter in mode 'nearest'
_BAND_TOL = 1e-10  # matrix entries below this fraction of the largest are dropped (float32 eps is 6e-8)
_ROW_BLOCK = 64  # output rows per matmul block along one axis
_MIXED_CHUNK = 1 << 18  # mixed label voxels decided per batch (bounds the temporary memory)


def compute_new_shape(shape: Sequence[int], old_spacing: Sequence[float],
                      new_spacing: Sequence[float]) -> tuple[int, ...]:
    """Spatial shape after resampling from `old_spacing` to `new_spacing` (mm, same axis order).

    round(old / new * size) per axis, as nnU-Net computes it (half to even), and at least 1.
    """
    _check_spacings(old_spacing, new_spacing, len(shape))
    return tuple(max(1, int(round(float(o) / float(n) * int(s))))
                 for s, o, n in zip(shape, old_spacing, new_spacing))


def separate_axis(old_spacing: Sequence[float], new_spacing: Sequence[float],
                  threshold: float = 3.0) -> int | None:
    """The spatial axis to resample separately (nnU-Net's "separate z"), or None.

    If the current spacing's max/min ratio exceeds `threshold`, its coarsest axis; otherwise, if the
    target spacing is that anisotropic, the target's coarsest axis. None when neither is anisotropic
    or when the coarsest spacing is shared by two or more axes (e.g. 0.24 x 1.25 x 1.25 mm).
    """
    _check_spacings(old_spacing, new_spacing, len(old_spacing))
    for spacing in (old_spacing, new_spacing):
        values = np.asarray(spacing, dtype=np.float64)
        if values.max() / values.min() > threshold:
            coarsest = np.flatnonzero(values == values.max())
            return int(coarsest[0]) if coarsest.size == 1 else None
    return None


def resample_image(data: np.ndarray, new_shape: Sequence[int], *, order: int = 3, order_z: int = 0,
                   separate_axis: int | None = None) -> np.ndarray:
    """Resample image channels `data` (c, z, y, x) to (c, *new_shape) as float32.

    `order` is the spline order (0-5) used along every axis, or in-plane when `separate_axis` is set;
    `order_z` is then used along that axis (0 = nearest neighbour, nnU-Net's default). Each channel is
    clipped to its input range (per slice with a separate axis), as skimage's resize does.
    """
    new_shape = _check_call(data.ndim - 1, data.shape[1:], new_shape, separate_axis, "data")
    _check_order(order, "order")
    _check_order(order_z, "order_z")
    logger.debug("resample image %s -> %s (order %d, order_z %d, separate axis %s)",
                 data.shape, new_shape, order, order_z, separate_axis)
    out = np.empty((data.shape[0], *new_shape), dtype=np.float32)
    for channel in range(data.shape[0]):
        volume = np.ascontiguousarray(data[channel], dtype=np.float32)
        _resample_volume(volume, new_shape, order, order_z, separate_axis, out[channel])
    return out


def resample_probabilities(probs: np.ndarray, new_shape: Sequence[int], *, order: int = 1, order_z: int = 0,
                           separate_axis: int | None = None) -> np.ndarray:
    """Resample class probabilities or logits (c, z, y, x) to (c, *new_shape) as float32 (export).

    The same interpolation as `resample_image`, with nnU-Net's export default of linear (order 1).
    """
    return resample_image(probs, new_shape, order=order, order_z=order_z, separate_axis=separate_axis)


def resample_label(label: np.ndarray, new_shape: Sequence[int], *, order: int = 1, order_z: int = 0,
                   separate_axis: int | None = None) -> np.ndarray:
    """Resample a label map (z, y, x) or (c, z, y, x) of integers (-1 allowed) to `new_shape`.

    order 1 (default): every label as a binary mask, linearly interpolated, set where >= 0.5, higher
    labels overwriting lower ones, 0 where no label reaches 0.5 -- equal to nnU-Net's per-label resize.
    order 0: nearest neighbour. With `separate_axis`, `order_z` (0 or 1) applies along that axis; for
    order_z 1 a label needs > 0.5 there, as nnU-Net's rounding gives. The dtype is kept.
    """
    spatial = len(tuple(new_shape))
    if label.ndim == spatial + 1:
        out = np.empty((label.shape[0], *(int(s) for s in new_shape)), dtype=label.dtype)
        for channel in range(label.shape[0]):
            out[channel] = resample_label(label[channel], new_shape, order=order, order_z=order_z,
                                          separate_axis=separate_axis)
        return out
    new_shape = _check_call(label.ndim, label.shape, new_shape, separate_axis, "label")
    for value, name in ((order, "order"), (order_z, "order_z")):
        if value not in (0, 1):
            raise SettingsError(f"label resampling supports {name} 0 or 1, got {value!r}",
                                hint="use 1 (per-label linear, nnU-Net's default) or 0 (nearest)")
    logger.debug("resample label %s -> %s (order %d, order_z %d, separate axis %s)",
                 label.shape, new_shape, order, order_z, separate_axis)
    return _resample_label_volume(np.ascontiguousarray(label), new_shape, order, order_z, separate_axis)


# ---------------------------------------------------------------- validation


def _check_spacings(old_spacing: Sequence[float], new_spacing: Sequence[float], ndim: int) -> None:
    if len(old_spacing) != ndim or len(new_spacing) != ndim:
        raise SettingsError(f"spacings {tuple(old_spacing)} and {tuple(new_spacing)} do not have {ndim} axes",
                            hint="give one spacing (mm) per spatial axis, in the array's axis order")
    if min(min(old_spacing), min(new_spacing)) <= 0:
        raise SettingsError(f"spacings must be positive, got {tuple(old_spacing)} -> {tuple(new_spacing)}",
                            hint="check the image header or the planned target spacing")


def _check_call(ndim: int, shape: tuple[int, ...], new_shape: Sequence[int], axis: int | None,
                name: str) -> tuple[int, ...]:
    target = tuple(int(s) for s in new_shape)
    if ndim < 1 or len(target) != ndim:
        raise SettingsError(f"{name} of shape {shape} cannot be resampled to {target}",
                            hint="give new_shape as the spatial shape only (no channel axis)")
    if min(target) < 1 or min(shape) < 1:
        raise SettingsError(f"cannot resample {shape} to {target}: every axis needs at least 1 voxel",
                            hint="check the spacings used to compute the new shape")
    if axis is not None and not 0 <= axis < ndim:
        raise SettingsError(f"separate_axis {axis} is not a spatial axis of {shape}",
                            hint=f"use None or a spatial axis index 0..{ndim - 1} (0 = z)")
    return target


def _check_order(order: int, name: str) -> None:
    if order not in range(6):
        raise SettingsError(f"interpolation {name} must be 0..5, got {order!r}", hint="use 3 for images, "
                            "1 for probabilities, 0 for nearest neighbour")


# ---------------------------------------------------------------- 1D operators along one axis


def _source_coordinates(n_in: int, n_out: int) -> np.ndarray:
    """Input coordinate of each output voxel centre (half-pixel centres, as skimage/scipy grid_mode)."""
    return (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Nearest input voxel per output voxel; halves round up, edges clamp (scipy order 0, 'nearest')."""
    coords = np.clip(_source_coordinates(n_in, n_out), 0, n_in - 1)
    return np.minimum(np.floor(coords + 0.5), n_in - 1).astype(np.intp)


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lower/upper input index and their weights per output voxel, with scipy's exact arithmetic.

    Weights come from the unclamped coordinate and the indices are clamped into the volume (mode
    'nearest'); the upper weight is 1 - (1 - f), not f. Bit-equal weights make label decisions at
    exact ties (0.5) come out as in the per-label reference.
    """
    coords = _source_coordinates(n_in, n_out)
    low = np.floor(coords)
    w_low = 1.0 - (coords - low)
    low = low.astype(np.intp)
    return np.clip(low, 0, n_in - 1), np.clip(low + 1, 0, n_in - 1), w_low, 1.0 - w_low


def _bspline(t: np.ndarray, order: int) -> np.ndarray:
    """Centred B-spline of `order` at offsets `t` (truncated power form; float64)."""
    total = np.zeros_like(t)
    for k in range(order + 2):
        total += (-1) ** k * math.comb(order + 1, k) * np.maximum(t + (order + 1) / 2 - k, 0.0) ** order
    return total / math.factorial(order)


def _axis_matrix(n_in: int, n_out: int, order: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix resampling one axis with spline `order`, edge mode.

    For order >= 2 the identity is edge-padded, spline-prefiltered along the axis and weighted at the
    taps, so one matmul equals scipy's pad + prefilter + (order + 1)-tap interpolation on that axis.
    """
    if order == 1:  # (order 0 never gets here: it is a gather)
        low, high, w_low, w_high = _linear_taps(n_in, n_out)
        matrix = np.zeros((n_out, n_in))
        np.add.at(matrix, (np.arange(n_out), low), w_low)
        np.add.at(matrix, (np.arange(n_out), high), w_high)
        return matrix
    padded = np.pad(np.eye(n_in), ((_SPLINE_PAD, _SPLINE_PAD), (0, 0)), mode="edge")
    coefficients = ndimage.spline_filter1d(padded, order, axis=0, mode="nearest", output=np.float64)
    coords = _source_coordinates(n_in, n_out) + _SPLINE_PAD
    start = np.floor(coords if order % 2 else coords + 0.5).astype(np.intp) - order // 2
    matrix = np.zeros((n_out, n_in))
    for tap in range(order + 1):
        weight = _bspline(coords - (start + tap), order)
        matrix += weight[:, None] * coefficients[start + tap]
    return matrix


def _apply_matrix(x: np.ndarray, matrix: np.ndarray, axis: int, out: np.ndarray | None = None) -> np.ndarray:
    """Multiply float32 `x` by `matrix` (n_out, n_in) along `axis`, block by block over the band."""
    shape = list(x.shape)
    n_in, n_out = shape[axis], matrix.shape[0]
    before, after = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1:]))
    shape[axis] = n_out
    out = np.empty(shape, dtype=np.float32) if out is None else out
    source = x.reshape(before, n_in, after)
    target = out.reshape(before, n_out, after)
    significant = np.abs(matrix) > _BAND_TOL * np.abs(matrix).max()
    weights = matrix.astype(np.float32)
    for r0 in range(0, n_out, _ROW_BLOCK):
        r1 = min(r0 + _ROW_BLOCK, n_out)
        columns = np.flatnonzero(significant[r0:r1].any(axis=0))
        c0, c1 = int(columns[0]), int(columns[-1]) + 1
        block = weights[r0:r1, c0:c1]
        if after == 1:
            np.matmul(source[:, c0:c1, 0], block.T, out=target[:, r0:r1, 0])
        elif before == 1:
            np.matmul(block, source[0, c0:c1], out=target[0, r0:r1])
        else:
            np.matmul(block, source[:, c0:c1], out=target[:, r0:r1])
    return out


# ---------------------------------------------------------------- images


def _resample_volume(volume: np.ndarray, new_shape: tuple[int, ...], order: int, order_z: int,
                     axis: int | None, out: np.ndarray) -> None:
    """Resample one float32 channel into `out`: the planned axis steps in sequence, the last into `out`.

    The result of the in-plane steps (all steps without a separate axis) is clipped to the range of
    the array they started from, per slice along the separate axis, as skimage clips each resize.
    """
    steps, first, last = _plan_steps(volume.shape, new_shape, order, order_z, axis)
    if not steps:
        out[...] = volume
        return
    x = volume
    for i, (a, kind, operator) in enumerate(steps):
        if i == first:
            others = tuple(b for b in range(x.ndim) if b != axis)
            low, high = x.min(axis=others, keepdims=True), x.max(axis=others, keepdims=True)
        target = out if i == len(steps) - 1 else None
        if kind == "take":  # mode 'clip' (indices are in range): numpy buffers `out` for mode 'raise'
            x = np.take(x, operator, axis=a, out=target, mode="clip")
        else:
            x = _apply_matrix(x, operator, a, target)
        if i == last:
            np.clip(x, low, high, out=x)


def _plan_steps(shape: tuple[int, ...], new_shape: tuple[int, ...], order: int, order_z: int,
                axis: int | None) -> tuple[list[tuple[int, str, np.ndarray]], int, int]:
    """Steps (axis, 'take' | 'matrix', operator) and the first and last in-plane step (-1: none).

    In-plane axes go in order of their size ratio, the one that shrinks most first. A nearest-
    neighbour step along the separate axis goes first when it shrinks that axis, else last.
    """
    def operator(a: int, k: int) -> tuple[int, str, np.ndarray]:
        if k == 0:
            return a, "take", _nearest_index(shape[a], new_shape[a])
        return a, "matrix", _axis_matrix(shape[a], new_shape[a], k)

    in_plane = sorted((a for a in range(len(shape)) if a != axis and shape[a] != new_shape[a]),
                      key=lambda a: new_shape[a] / shape[a])
    steps = [operator(a, order) for a in in_plane]
    first, last = (0, len(steps) - 1) if steps else (-1, -1)
    if axis is not None and shape[axis] != new_shape[axis]:
        if order_z == 0 and new_shape[axis] < shape[axis]:
            return [operator(axis, 0), *steps], first + 1 if steps else -1, last + 1 if steps else -1
        steps.append(operator(axis, order_z))
    return steps, first, last


# ---------------------------------------------------------------- labels


def _resample_label_volume(label: np.ndarray, new_shape: tuple[int, ...], order: int, order_z: int,
                           axis: int | None) -> np.ndarray:
    """One spatial label volume; the separate axis (if any) is handled before or after the plane."""
    shape = label.shape
    changed = [a for a in range(label.ndim) if shape[a] != new_shape[a]]
    if not changed:
        return label.copy()
    if order == 0:
        return _take_axes(label, {a: _nearest_index(shape[a], new_shape[a]) for a in changed})
    if axis is None or axis not in changed:
        return _linear_labels(label, new_shape, changed, strict=False)
    in_plane = [a for a in changed if a != axis]
    plane_shape = tuple(n if a == axis else new_shape[a] for a, n in enumerate(shape))
    if order_z == 1:
        planar = _linear_labels(label, plane_shape, in_plane, strict=False)
        return _linear_labels(planar, new_shape, [axis], strict=True)
    index = {axis: _nearest_index(shape[axis], new_shape[axis])}
    if new_shape[axis] < shape[axis]:
        return _linear_labels(_take_axes(label, index), new_shape, in_plane, strict=False)
    return _take_axes(_linear_labels(label, plane_shape, in_plane, strict=False), index)


def _take_axes(array: np.ndarray, index: dict[int, np.ndarray]) -> np.ndarray:
    """Gather `index[a]` along each axis a, the axis that shrinks most first."""
    for a in sorted(index, key=lambda a: len(index[a]) / array.shape[a]):
        array = np.take(array, index[a], axis=a, mode="clip")
    return array


def _linear_labels(label: np.ndarray, new_shape: tuple[int, ...], axes: list[int], *,
                   strict: bool) -> np.ndarray:
    """Per-label linear interpolation along `axes` (the others keep their size), decided voxelwise.

    Where all 2^k corners of a voxel's interpolation cell share one label, that label wins with
    weight 1; only mixed cells run the per-label arithmetic (see `_decide_mixed`).
    """
    if not axes:
        return label.copy()
    taps = {a: _linear_taps(label.shape[a], new_shape[a]) for a in axes}
    lower = {a: taps[a][0] for a in axes}
    result = _take_axes(label, lower)
    mixed = np.flatnonzero(_take_axes(_mixed_cells(label, axes), lower))
    for start in range(0, mixed.size, _MIXED_CHUNK):
        chunk = mixed[start:start + _MIXED_CHUNK]
        coords = np.unravel_index(chunk, new_shape)
        result.flat[chunk] = _decide_mixed(label, coords, taps, strict=strict)
    return result


def _mixed_cells(label: np.ndarray, axes: list[int]) -> np.ndarray:
    """True where the cell from a voxel to its +1 neighbours along `axes` (edge-clamped) mixes labels."""
    padded = np.pad(label, [(0, 1) if a in axes else (0, 0) for a in range(label.ndim)], mode="edge")
    mixed = np.zeros(label.shape, dtype=bool)
    for offset in itertools.product((0, 1), repeat=len(axes)):
        if any(offset):
            window = [slice(0, n) for n in label.shape]
            for a, step in zip(axes, offset):
                window[a] = slice(step, step + label.shape[a])
            mixed |= padded[tuple(window)] != label
    return mixed


def _decide_mixed(label: np.ndarray, coords: tuple[np.ndarray, ...], taps: dict, *, strict: bool) -> np.ndarray:
    """Labels of output voxels `coords` whose interpolation cell mixes labels.

    Mirrors the reference to the bit: the weight of a corner is the product of the axis weights in
    axis order, a label's value sums its corners' weights one by one in C order, and labels are set
    in ascending order where their value is >= 0.5 (> 0.5 when `strict`), 0 where none is. With more
    distinct labels than corners, the loop runs over corners instead (same result, fewer passes).
    """
    corner_labels, corner_weights = _corners(label, coords, taps)
    values = np.unique(np.concatenate(corner_labels))
    if values.size > len(corner_labels):
        return _decide_by_corner(corner_labels, corner_weights, strict=strict)
    decided = np.zeros(coords[0].shape, dtype=label.dtype)
    for value in values:  # ascending: a higher label overwrites a lower one, as in the reference
        total = np.zeros(coords[0].shape, dtype=np.float64)
        for labels, weight in zip(corner_labels, corner_weights):
            total += np.where(labels == value, weight, 0.0)
        decided[total > 0.5 if strict else total >= 0.5] = value
    return decided


def _corners(label: np.ndarray, coords: tuple[np.ndarray, ...], taps: dict) -> tuple[list, list]:
    """Label and weight of each of the 2^k cell corners (C order) of output voxels `coords`."""
    axes = sorted(taps)
    strides = [int(np.prod(label.shape[a + 1:])) for a in range(label.ndim)]
    base = sum(coords[a] * strides[a] for a in range(label.ndim) if a not in taps)
    # per axis and step (0 = lower, 1 = upper): flat-index term and weight of every voxel
    terms = {a: [taps[a][step][coords[a]] * strides[a] for step in (0, 1)] for a in axes}
    factors = {a: [taps[a][2 + step][coords[a]] for step in (0, 1)] for a in axes}
    flat = label.reshape(-1)
    corner_labels, corner_weights = [], []
    for offset in itertools.product((0, 1), repeat=len(axes)):
        index, weight = base, None
        for a, step in zip(axes, offset):
            index = index + terms[a][step]
            weight = factors[a][step] if weight is None else weight * factors[a][step]
        corner_labels.append(flat[index])
        corner_weights.append(weight)
    return corner_labels, corner_weights


def _decide_by_corner(corner_labels: list, corner_weights: list, *, strict: bool) -> np.ndarray:
    """The same decision taking each corner's label as candidate: the highest passing label wins."""
    decided = np.zeros_like(corner_labels[0])
    found = np.zeros(decided.shape, dtype=bool)
    for candidate in corner_labels:
        total = np.zeros(decided.shape, dtype=np.float64)
        for labels, weight in zip(corner_labels, corner_weights):
            total += np.where(labels == candidate, weight, 0.0)
        hit = total > 0.5 if strict else total >= 0.5
        take = hit & (~found | (candidate > decided))
        decided[take] = candidate[take]
        found |= hit
    return decided
