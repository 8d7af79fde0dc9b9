"""Image I/O and geometry (a leaf package: imports nothing else from autoseg but errors)."""

from autoseg.io.geometry import Geometry
from autoseg.io.readers import (
    SUPPORTED_ENDINGS,
    file_ending,
    read_array,
    read_header,
    read_images,
    read_label,
    write_image,
    write_label,
)

__all__ = [
    "SUPPORTED_ENDINGS",
    "Geometry",
    "file_ending",
    "read_array",
    "read_header",
    "read_images",
    "read_label",
    "write_image",
    "write_label",
]
