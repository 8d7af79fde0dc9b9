"""The previous cascade stage's segmentation as extra input of the next stage (3d_lowres -> 3d_cascade_fullres).

The previous stage's segmentation arrives on the scan's original grid (a prediction file, (z, y, x)).
It is brought onto the case's preprocessed grid exactly as the case's own label was (transpose, crop,
label resampling), stored beside the case cache for training, and fed to the network as one-hot
channels (one per foreground label value, ascending) appended after the image channels.

    <preprocessed>/<dataset>/<data id>/previous_<stage>/<case>.npy   int8/int16 (z, y, x), preprocessed grid
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoseg.errors import SettingsError
from autoseg.planning.contract import Configuration, Plans
from autoseg.planning.identifier import DEFAULT_PLANS
from autoseg.preprocessing.contract import CaseProperties
from autoseg.preprocessing.resample import resample_label, separate_axis


def to_preprocessed_grid(
    label: np.ndarray, properties: CaseProperties, *, plans: Plans, config: Configuration
) -> np.ndarray:
    """A label map (z, y, x) on the original image's grid -> the case's preprocessed grid (int8/int16).

    The forward counterpart of `inverse.restore_label`: transpose, crop to `properties.crop_box`,
    resample to `properties.shape` with the configuration's label resampling.
    """
    label = np.asarray(label)
    order = plans.transpose_forward
    if label.ndim != len(order) or tuple(label.shape[a] for a in order) != tuple(properties.shape_before_crop):
        original = tuple(properties.shape_before_crop[a] for a in plans.transpose_backward)
        raise SettingsError(f"the previous-stage segmentation has shape {label.shape}, the scan {original}",
                            hint="give the previous stage's prediction of this very scan (same grid)")
    region = tuple(slice(start, stop) for start, stop in properties.crop_box)
    cropped = np.ascontiguousarray(label.transpose(order)[region]).astype(np.int16)
    axis = separate_axis(properties.spacing_before_resample, properties.spacing,
                         threshold=config.resampling.anisotropy_threshold)
    seg = resample_label(cropped, properties.shape, order=config.resampling.order_label,
                         order_z=config.resampling.order_z, separate_axis=axis)
    return seg.astype(np.int8 if seg.max(initial=0) < 128 else np.int16)


def one_hot(seg: np.ndarray, values: Sequence[int], *, axis: int = 0) -> np.ndarray:
    """float32 indicator channels of `seg`, one per value (in the given order), inserted at `axis`.

    Voxels holding any other value (background, -1 outside) are 0 in every channel.
    """
    seg = np.asarray(seg)
    return np.stack([seg == value for value in values], axis=axis).astype(np.float32)


def previous_dir(cache: Path, stage: str, plans_name: str = DEFAULT_PLANS) -> Path:
    """Where the previous stage's segmentations of a case cache are stored: `previous_<stage>` for the
    default plans, `previous_<stage>__<identifier>` for another plans identifier (network family), so
    that families sharing one cache (same spacing and normalisation) keep their own lowres predictions."""
    suffix = "" if plans_name == DEFAULT_PLANS else f"__{plans_name}"
    return Path(cache) / f"previous_{stage}{suffix}"


def previous_file(cache: Path, stage: str, case_id: str, plans_name: str = DEFAULT_PLANS) -> Path:
    return previous_dir(cache, stage, plans_name) / f"{case_id}.npy"
