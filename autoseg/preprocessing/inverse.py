"""The exact inverse of preprocessing: from the network's grid back to the original image.

Predictions live on the cropped, transposed, resampled grid. These functions undo the
resampling, then the crop, then the transpose, so the result matches the input scan voxel for
voxel and can be written with its original Geometry.
"""

from __future__ import annotations

import numpy as np

from autoseg.planning.contract import Configuration, Plans
from autoseg.preprocessing.contract import CaseProperties
from autoseg.preprocessing.crop import uncrop
from autoseg.preprocessing.resample import resample_label, resample_probabilities, separate_axis


def resampling_axis(properties: CaseProperties, config: Configuration) -> int | None:
    """The axis resampled separately (anisotropic spacing), or None: as preprocessing decided it."""
    return separate_axis(properties.spacing, properties.spacing_before_resample,
                         threshold=config.resampling.anisotropy_threshold)


def _untranspose(array: np.ndarray, plans: Plans, leading: int) -> np.ndarray:
    order = tuple(range(leading)) + tuple(leading + a for a in plans.transpose_backward)
    return np.ascontiguousarray(array.transpose(order))


def restore_label(
    seg: np.ndarray, properties: CaseProperties, *, plans: Plans, config: Configuration
) -> np.ndarray:
    """A (z, y, x) label map on the preprocessed grid -> the original image's grid (uint8/int16)."""
    resampled = resample_label(seg, properties.shape_after_crop, order=config.resampling.order_label,
                               order_z=config.resampling.order_z, separate_axis=resampling_axis(properties, config))
    resampled = np.where(resampled < 0, 0, resampled)
    full = uncrop(resampled, properties.crop_box, properties.shape_before_crop, fill=0)
    return _untranspose(full, plans, leading=0)


def restore_probabilities(
    probabilities: np.ndarray, properties: CaseProperties, *, plans: Plans, config: Configuration
) -> np.ndarray:
    """(c, z, y, x) class probabilities -> the original grid; outside the crop, background is certain."""
    resampled = resample_probabilities(
        probabilities.astype(np.float32, copy=False), properties.shape_after_crop,
        order=config.resampling.order_probabilities, order_z=config.resampling.order_z,
        separate_axis=resampling_axis(properties, config))
    full = uncrop(resampled, properties.crop_box, properties.shape_before_crop, fill=0.0)
    outside = np.ones(properties.shape_before_crop, dtype=bool)
    outside[tuple(slice(a, b) for a, b in properties.crop_box)] = False
    full[0][outside] = 1.0
    return _untranspose(full, plans, leading=1)


def resample_to_crop(channel: np.ndarray, properties: CaseProperties, *, config: Configuration) -> np.ndarray:
    """One float map (z, y, x) on the preprocessed grid -> the cropped original grid (still transposed).

    Used channel by channel, so exporting a many-class prediction never holds every class at full size.
    """
    return resample_probabilities(
        channel[None].astype(np.float32, copy=False), properties.shape_after_crop,
        order=config.resampling.order_probabilities, order_z=config.resampling.order_z,
        separate_axis=resampling_axis(properties, config))[0]


def place_in_original(array: np.ndarray, properties: CaseProperties, *, plans: Plans, fill: float = 0,
                      leading: int = 0) -> np.ndarray:
    """Undo the crop (filling outside with `fill`) and the transpose of a cropped-grid array."""
    full = uncrop(array, properties.crop_box, properties.shape_before_crop, fill=fill)
    return _untranspose(full, plans, leading=leading)
