"""Segmentation metrics on boolean masks: overlap, volume and spacing-aware surface distances.

Every function is pure (numpy/scipy in, floats out). Masks are boolean arrays in array order
(z, y, x) and `spacing` is mm per voxel in the same order. Conventions for empty masks:

* both masks empty: Dice, IoU, HD95 and NSD are NaN ("not defined"); callers exclude them from
  means and count them separately.
* exactly one mask empty: Dice 0, IoU 0, NSD 0 and HD95 = the diagonal of the image extent in mm,
  a finite worst case that keeps means finite (an infinite or NaN HD95 would poison every mean).

Surfaces are the mask voxels with at least one *face* neighbour outside the mask
(`mask XOR binary_erosion(mask)` with the face-connectivity structure, as in MONAI and medpy);
outside the image counts as background, so a mask touching the border has surface there.
Axes of length 1 are dropped first, so a 2D image stored as (1, y, x) gets 2D contours.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

Combine = Literal["union", "max"]


class Counts(NamedTuple):
    """Voxel counts of one label: true/false positives, false/true negatives."""

    tp: int
    fp: int
    fn: int
    tn: int


class SurfaceScores(NamedTuple):
    """HD95 in mm and normalised surface Dice in [0, 1] (NaN when both masks are empty)."""

    hd95: float
    nsd: float


def confusion_counts(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None) -> Counts:
    """TP, FP, FN, TN of two masks; voxels where `valid` is False count nowhere (ignore label)."""
    pred, ref = _as_masks(pred, ref)
    if valid is None:
        total = pred.size
    else:
        valid = np.asarray(valid, dtype=bool)
        pred, ref = pred & valid, ref & valid
        total = int(np.count_nonzero(valid))
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(ref)) - tp
    return Counts(tp=tp, fp=fp, fn=fn, tn=total - tp - fp - fn)


def dice_score(counts: Counts) -> float:
    """2 TP / (2 TP + FP + FN); NaN when both masks are empty, 0 when exactly one is."""
    denominator = 2 * counts.tp + counts.fp + counts.fn
    return 2.0 * counts.tp / denominator if denominator else float("nan")


def iou_score(counts: Counts) -> float:
    """TP / (TP + FP + FN) (Jaccard); NaN when both masks are empty, 0 when exactly one is."""
    denominator = counts.tp + counts.fp + counts.fn
    return counts.tp / denominator if denominator else float("nan")


def volume_mm3(n_voxels: int, spacing: tuple[float, ...]) -> float:
    """Volume of `n_voxels` voxels of size `spacing` (mm per axis) in mm^3."""
    return float(n_voxels) * float(np.prod(spacing))


def image_diagonal_mm(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    """Diagonal of the image extent (voxels x spacing per axis, axes of length 1 left out) in mm.

    The HD95 reported when exactly one mask is empty: no surface distance inside the image can
    be larger, so it is the worst finite value.
    """
    kept = [(n * s) ** 2 for n, s in zip(shape, spacing) if n > 1]
    return float(np.sqrt(sum(kept)))


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of `mask`: those with a face neighbour outside it (or outside the image)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 0:
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], *, crop: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (each pred surface voxel -> nearest ref surface voxel, and back).

    Both masks must be non-empty. With `crop` the work is done on the bounding box of both masks
    plus one voxel, which is exact: the one-voxel margin keeps every surface voxel (erosion sees
    the same neighbours), and the Euclidean distance transform measures straight-line distances
    to surface voxels, all of which lie inside the box.
    """
    from scipy import ndimage

    pred, ref = _as_masks(pred, ref)
    _check_spacing(pred, spacing)
    if not (pred.any() and ref.any()):
        raise ValueError("surface distances need two non-empty masks")
    pred, ref, spacing = _drop_singleton_axes(pred, ref, spacing)
    if crop:
        box = _bounding_box(pred | ref, margin=1)
        pred, ref = pred[box], ref[box]
    pred_surface, ref_surface = surface(pred), surface(ref)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return np.asarray(to_ref[pred_surface]), np.asarray(to_pred[ref_surface])


def surface_scores(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: tuple[float, ...],
    *,
    tolerance_mm: float = 1.0,
    percentile: float = 95.0,
    combine: Combine = "max",
    crop: bool = True,
) -> SurfaceScores:
    """HD95 and NSD from one pair of distance transforms (see `hausdorff95`, `normalized_surface_dice`)."""
    pred, ref = _as_masks(pred, ref)
    _check_spacing(pred, spacing)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not (has_pred or has_ref):
        return SurfaceScores(hd95=float("nan"), nsd=float("nan"))
    if not (has_pred and has_ref):
        return SurfaceScores(hd95=image_diagonal_mm(pred.shape, spacing), nsd=0.0)
    to_ref, to_pred = surface_distances(pred, ref, spacing, crop=crop)
    if combine == "union":
        hd = float(np.percentile(np.concatenate([to_ref, to_pred]), percentile))
    elif combine == "max":
        hd = max(float(np.percentile(to_ref, percentile)), float(np.percentile(to_pred, percentile)))
    else:
        raise ValueError(f"combine must be 'union' or 'max', not {combine!r}")
    within = np.count_nonzero(to_ref <= tolerance_mm) + np.count_nonzero(to_pred <= tolerance_mm)
    return SurfaceScores(hd95=hd, nsd=float(within) / float(to_ref.size + to_pred.size))


def hausdorff95(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: tuple[float, ...],
    *,
    percentile: float = 95.0,
    combine: Combine = "max",
    crop: bool = True,
) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm.

    "max" (default): the larger of the two directed percentiles (MONAI `directed=False`, DeepMind
    `compute_robust_hausdorff`). "union": the percentile of both directed distance sets pooled
    together (medpy's hd95). Percentiles interpolate linearly (numpy's default).
    Both empty: NaN; exactly one empty: `image_diagonal_mm`.
    """
    return surface_scores(pred, ref, spacing, percentile=percentile, combine=combine, crop=crop).hd95


def normalized_surface_dice(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], *, tolerance_mm: float = 1.0, crop: bool = True
) -> float:
    """Normalised surface Dice (Nikolov et al. 2021) at `tolerance_mm`, counting surface voxels.

    (surface voxels of pred within tolerance of ref's surface + those of ref within tolerance of
    pred's) / (all surface voxels of both). Voxel counts stand in for the paper's surfel areas.
    Both empty: NaN; exactly one empty: 0.
    """
    return surface_scores(pred, ref, spacing, tolerance_mm=tolerance_mm, crop=crop).nsd


def _as_masks(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape}, reference {ref.shape}")
    return pred, ref


def _check_spacing(mask: np.ndarray, spacing: tuple[float, ...]) -> None:
    if len(spacing) != mask.ndim or not all(float(s) > 0 for s in spacing):
        raise ValueError(f"spacing {tuple(spacing)} must give one positive value per axis of shape {mask.shape}")


def _drop_singleton_axes(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Remove axes of length 1 (a 2D slice stored as (1, y, x)): erosion would see a border there."""
    keep = [axis for axis, n in enumerate(pred.shape) if n > 1] or [pred.ndim - 1]
    shape = tuple(pred.shape[axis] for axis in keep)
    return pred.reshape(shape), ref.reshape(shape), tuple(float(spacing[axis]) for axis in keep)


def _bounding_box(mask: np.ndarray, *, margin: int) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel, widened by `margin` (clipped to the image)."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)
