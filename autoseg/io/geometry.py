"""Geometry: the one place that converts between a file's axis order and autoseg's (z, y, x).

Files (NIfTI, MHA, NRRD) describe voxels in (x, y, z) order; SimpleITK's array view and every
array inside autoseg are (z, y, x). `Geometry` keeps the file's own spacing, origin and
direction untouched, so a segmentation written with it lands exactly on the input scan, and
offers the array-order views (`array_spacing`, `shape`) that the rest of the pipeline uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

#: Spacing given to the missing through-plane axis of a 2D image (nnU-Net uses the same value),
#: so the planner treats that axis as the coarsest one.
DUMMY_2D_SPACING = 999.0


@dataclass(frozen=True)
class Geometry:
    """Spatial description of one image.

    shape: voxels per axis in array order (z, y, x); 2D images get a leading axis of 1.
    file_spacing: mm per voxel in file order (x, y[, z]).
    origin: physical position (mm, LPS as ITK reports it) of the first voxel, file order.
    direction: row-major direction-cosine matrix of size dim x dim (ITK convention).
    """

    shape: tuple[int, ...]
    file_spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @property
    def dim(self) -> int:
        """Number of spatial dimensions stored in the file (2 or 3)."""
        return len(self.file_spacing)

    @property
    def array_spacing(self) -> tuple[float, ...]:
        """Spacing in array order (z, y, x); 2D images get DUMMY_2D_SPACING along z."""
        reversed_spacing = tuple(reversed(self.file_spacing))
        if self.dim == 2:
            return (DUMMY_2D_SPACING, *reversed_spacing)
        return reversed_spacing

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Geometry:
        size = tuple(int(s) for s in reversed(image.GetSize()))
        if image.GetDimension() == 2:
            size = (1, *size)
        return cls(
            shape=size,
            file_spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> None:
        """Give a SimpleITK image this geometry (spacing, origin, direction)."""
        image.SetSpacing(self.file_spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def differences(self, other: Geometry) -> dict[str, float]:
        """Largest absolute difference per attribute: spacing (mm), origin (mm), direction."""
        if self.dim != other.dim:
            return {"dimension": float(abs(self.dim - other.dim))}
        return {
            "spacing": _max_abs_diff(self.file_spacing, other.file_spacing),
            "origin": _max_abs_diff(self.origin, other.origin),
            "direction": _max_abs_diff(self.direction, other.direction),
        }


def _max_abs_diff(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) if a else 0.0


def geometry_from_affine(affine: np.ndarray, shape_xyz: tuple[int, ...]) -> Geometry:
    """Geometry from a NIfTI (RAS) affine, converted to ITK's LPS convention."""
    flip = np.diag([-1.0, -1.0, 1.0])
    matrix = flip @ np.asarray(affine, dtype=float)[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    spacing[spacing == 0] = 1.0
    direction = matrix / spacing
    origin = flip @ np.asarray(affine, dtype=float)[:3, 3]
    return Geometry(
        shape=tuple(int(s) for s in reversed(shape_xyz)),
        file_spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in origin),
        direction=tuple(float(d) for d in direction.reshape(-1)),
    )
