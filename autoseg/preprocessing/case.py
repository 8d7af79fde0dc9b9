"""Preprocess one case in memory: transpose, crop, normalise, resample, sample class locations.

Pure functions on arrays, shared by dataset preprocessing and (later) prediction, so a new scan
is prepared exactly as the training cases were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from autoseg.errors import ImageReadError
from autoseg.io.geometry import Geometry
from autoseg.planning.contract import Configuration, Plans
from autoseg.preprocessing.contract import CaseProperties
from autoseg.preprocessing.crop import OUTSIDE, crop_to_nonzero
from autoseg.preprocessing.normalize import normalize
from autoseg.preprocessing.resample import compute_new_shape, resample_image, resample_label, separate_axis

#: Foreground locations stored per class: at most this many, but never under 1 % of the class.
MAX_LOCATIONS, MIN_LOCATION_FRACTION = 10_000, 0.01
LOCATION_SEED = 1234


@dataclass(frozen=True)
class PreprocessedCase:
    """A case ready for training: data (c, z, y, x) float32, seg (z, y, x) int8/int16, with
    OUTSIDE (-1) outside the body, and (n, 3) voxel coordinates per foreground class."""

    data: np.ndarray
    seg: np.ndarray
    box: tuple[tuple[int, int], ...]
    spacing_before_resample: tuple[float, ...]
    shape_after_crop: tuple[int, ...]
    spacing: tuple[float, ...]
    locations: dict[int, np.ndarray]


def target_spacing(config: Configuration, spacing: tuple[float, ...]) -> tuple[float, ...]:
    """The spacing to resample to: the plan's, with the case's own through-plane spacing for 2d."""
    if len(config.spacing) == len(spacing):
        return tuple(config.spacing)
    return (spacing[0], *config.spacing)


def preprocess_arrays(
    images: np.ndarray,
    label: np.ndarray | None,
    geometry: Geometry,
    *,
    plans: Plans,
    config: Configuration,
    classes: dict[int, tuple[int, ...]] | None = None,
) -> PreprocessedCase:
    """Prepare one case. images: (c, z, y, x) as read; label: (z, y, x) or None.

    `classes` maps a class key to the label values it covers (one value for plain labels,
    several for regions); locations are sampled for each key when a label is given.
    """
    check_finite(images, plans.channel_names)
    order = plans.transpose_forward
    images = images.transpose(0, *(axis + 1 for axis in order))
    label = None if label is None else label.transpose(order)
    spacing = tuple(geometry.array_spacing[axis] for axis in order)
    cropped, seg, box = crop_to_nonzero(images, label)
    data = normalize(cropped, schemes=config.normalization, use_mask=config.use_mask_for_norm,
                     intensity=plans.intensity, body=seg != OUTSIDE)
    target = target_spacing(config, spacing)
    new_shape = compute_new_shape(seg.shape, spacing, target)
    axis = separate_axis(spacing, target, threshold=config.resampling.anisotropy_threshold)
    options = {"order_z": config.resampling.order_z, "separate_axis": axis}
    data = resample_image(data, new_shape, order=config.resampling.order_image, **options)
    seg = resample_label(seg, new_shape, order=config.resampling.order_label, **options)
    seg = seg.astype(np.int8 if seg.max(initial=0) < 128 else np.int16)
    locations = sample_locations(seg, classes, seed=LOCATION_SEED) if label is not None and classes else {}
    return PreprocessedCase(data=data, seg=seg, box=box, spacing_before_resample=spacing,
                            shape_after_crop=tuple(cropped.shape[1:]), spacing=target, locations=locations)


def check_finite(images: np.ndarray, channel_names: tuple[str, ...] = ()) -> None:
    """ImageReadError when a channel (c, z, y, x) holds NaN or infinite voxels: normalisation would spread
    them over the whole volume and the prediction would be all background without a word."""
    for channel, image in enumerate(images):
        bad = image.size - int(np.count_nonzero(np.isfinite(image)))
        if bad:
            name = channel_names[channel] if channel < len(channel_names) else str(channel)
            raise ImageReadError(
                f"{bad} voxel(s) ({100 * bad / image.size:.2g} %) of channel {channel} ({name}) are NaN or infinite",
                hint="replace them in the image (e.g. with the background value) or re-export the scan; "
                     "`autoseg check` lists such files in a dataset")


def case_properties(case_id: str, images_shape: tuple[int, ...], geometry: Geometry, prepared: PreprocessedCase,
                    *, plans: Plans, source_hash: str = "") -> CaseProperties:
    """What preprocessing did to a case of `images_shape` (c, z, y, x), so that it can be undone."""
    return CaseProperties(
        case_id=case_id, geometry=geometry,
        shape_before_crop=tuple(images_shape[1 + a] for a in plans.transpose_forward),
        crop_box=prepared.box, spacing_before_resample=prepared.spacing_before_resample,
        shape_after_crop=prepared.shape_after_crop, spacing=prepared.spacing, shape=tuple(prepared.seg.shape),
        classes=tuple(key for key, coords in prepared.locations.items() if len(coords)), source_hash=source_hash,
    )


def sample_locations(
    seg: np.ndarray, classes: dict[int, tuple[int, ...]], *, seed: int
) -> dict[int, np.ndarray]:
    """Up to MAX_LOCATIONS (at least 1 %) voxel coordinates (n, 3) per class key, seeded."""
    rng = np.random.default_rng(seed)
    locations = {}
    for key, values in classes.items():
        coords = np.argwhere(np.isin(seg, values)).astype(np.int32)
        count = max(min(MAX_LOCATIONS, len(coords)), math.ceil(MIN_LOCATION_FRACTION * len(coords)))
        if count < len(coords):
            coords = coords[np.sort(rng.choice(len(coords), size=count, replace=False))]
        locations[key] = coords
    return locations
