"""Target spacing, axis order and resampled shapes (nnU-Net rules, reference §4.2-4.4).

All spacings are in mm and all shapes in voxels, per axis in array order (z, y, x) as the
fingerprint stores them, unless a name says "transposed".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger("autoseg.planning")

#: An axis is "anisotropic" when its spacing is more than this many times the others'.
ANISOTROPY_THRESHOLD = 3.0
#: Percentile of the coarse axis' spacings used as its target when the data is anisotropic.
ANISOTROPIC_PERCENTILE = 10.0
#: Added to the clamped coarse-axis spacing so that it stays strictly the coarsest axis.
CLAMP_EPSILON = 1e-5


def anisotropic_axis(median_spacing: Sequence[float], median_shape: Sequence[float]) -> int | None:
    """The coarse axis when the data is anisotropic, else None.

    Anisotropic needs both: the coarsest median spacing is more than 3x every other axis' spacing,
    and that axis has more than 3x fewer voxels than every other axis. The second condition
    keeps e.g. thin-slab volumes with many coarse slices (prostate MRI at 3 mm x 0.6 mm with as
    many slices as rows) at the median spacing.
    """
    worst = int(np.argmax(median_spacing))
    others = [i for i in range(len(median_spacing)) if i != worst]
    coarse = median_spacing[worst] > ANISOTROPY_THRESHOLD * max(median_spacing[i] for i in others)
    few_voxels = median_shape[worst] * ANISOTROPY_THRESHOLD < min(median_shape[i] for i in others)
    return worst if coarse and few_voxels else None


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> tuple[float, ...]:
    """The 3d_fullres target spacing (mm, array order) from per-case spacings and cropped shapes.

    Per-axis median; on anisotropic data the coarse axis takes the 10th percentile of its
    spacings instead (finer slices keep more information than the median would), clamped to
    stay above the largest other spacing (+1e-5) so that it remains the coarse axis.
    """
    spacing_array = np.asarray(spacings, dtype=np.float64)
    target = np.percentile(spacing_array, 50, axis=0)
    median_shape = np.percentile(np.asarray(shapes, dtype=np.float64), 50, axis=0)
    worst = anisotropic_axis(tuple(target), tuple(median_shape))
    if worst is not None:
        others = max(target[i] for i in range(len(target)) if i != worst)
        chosen = float(np.percentile(spacing_array[:, worst], ANISOTROPIC_PERCENTILE))
        if chosen < others:
            chosen = others + CLAMP_EPSILON
        log.info("anisotropic axis %d: target spacing %.4g mm (median %.4g mm)", worst, chosen, target[worst])
        target[worst] = chosen
    return tuple(float(t) for t in target)


def transpose_for(spacing: Sequence[float]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(forward, backward) axis permutations that put the coarsest axis first.

    Then 2D slices are the finest planes and lie contiguous in memory. Ties go to the lowest
    axis index (no transpose for isotropic data). `backward` undoes `forward`.
    """
    worst = int(np.argmax(spacing))
    forward = (worst, *(i for i in range(len(spacing)) if i != worst))
    backward = tuple(forward.index(i) for i in range(len(spacing)))
    return forward, backward


def resampled_median_shape(
    spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]], target: Sequence[float]
) -> tuple[float, ...]:
    """Median over cases of round(spacing / target * shape): the voxel shape after resampling.

    Kept as floats (a median of an even count can end in .5), in array order (untransposed). A
    resampled image keeps at least one voxel per axis.
    """
    spacing_array = np.asarray(spacings, dtype=np.float64)
    shape_array = np.asarray(shapes, dtype=np.float64)
    new_shapes = np.maximum(np.round(spacing_array / np.asarray(target, dtype=np.float64) * shape_array), 1.0)
    return tuple(float(v) for v in np.median(new_shapes, axis=0))


def permute(values: Sequence, order: Sequence[int]) -> tuple:
    """`values` reordered by the axis permutation `order`."""
    return tuple(values[i] for i in order)
