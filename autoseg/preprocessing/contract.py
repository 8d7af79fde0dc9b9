"""CaseProperties: what preprocessing did to one case, so it can be undone exactly."""

from __future__ import annotations

from dataclasses import dataclass

from autoseg.io.geometry import Geometry

CASE_FORMAT = 1


@dataclass(frozen=True)
class CaseProperties:
    """One preprocessed case. Shapes and spacings are in the plan's transposed array order.

    geometry: the original image geometry (file order, untouched), for writing predictions.
    crop_box: half-open (start, stop) per axis of the non-zero crop, in transposed order.
    classes: foreground labels (or region indices) present, with sampled voxel locations
    stored beside the case for foreground oversampling.
    """

    case_id: str
    geometry: Geometry
    shape_before_crop: tuple[int, ...]
    crop_box: tuple[tuple[int, int], ...]
    spacing_before_resample: tuple[float, ...]
    shape_after_crop: tuple[int, ...]
    spacing: tuple[float, ...]
    shape: tuple[int, ...]
    classes: tuple[int, ...]
    source_hash: str
    format: int = CASE_FORMAT
