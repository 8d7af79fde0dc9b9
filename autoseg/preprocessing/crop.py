"""Cropping to the non-zero region and its exact inverse (pure numpy).

Cropping removes the air or zero padding around a scan before resampling, which saves time and
memory in every later stage. The crop box is kept so predictions can be put back exactly.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_fill_holes

from autoseg.fingerprint.extract import nonzero_bounding_box

#: Label value for voxels outside the scanned body (zero in every channel, not enclosed by it).
OUTSIDE = -1

Box = tuple[tuple[int, int], ...]


def crop_to_nonzero(
    images: np.ndarray, label: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, Box]:
    """Crop (c, z, y, x) images (and a (z, y, x) label) to the box around non-zero voxels.

    Returns the cropped images, a cropped int16 label in which background voxels outside the
    filled non-zero mask are OUTSIDE (-1), and the half-open box per axis. Without a label, the
    returned label holds 0 inside the mask and OUTSIDE elsewhere, so normalisation can use it.
    """
    box = nonzero_bounding_box(images)
    region = tuple(slice(start, stop) for start, stop in box)
    cropped = np.ascontiguousarray(images[(slice(None), *region)])
    inside = binary_fill_holes(np.any(cropped != 0, axis=0))
    if label is None:
        cropped_label = np.zeros(cropped.shape[1:], dtype=np.int16)
    else:
        cropped_label = label[region].astype(np.int16)
    cropped_label[(cropped_label == 0) & ~inside] = OUTSIDE
    return cropped, cropped_label, box


def uncrop(array: np.ndarray, box: Box, full_shape: tuple[int, ...], *, fill: float = 0) -> np.ndarray:
    """Put a cropped array back into an array of `full_shape` (spatial), filling the rest.

    `array` is (z, y, x) or (c, z, y, x); the output keeps its leading channel axis and dtype.
    """
    leading = array.shape[: array.ndim - len(full_shape)]
    out = np.full((*leading, *full_shape), fill, dtype=array.dtype)
    region = tuple(slice(start, stop) for start, stop in box)
    out[(..., *region)] = array
    return out
