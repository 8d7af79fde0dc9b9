"""Reading and writing images and labels (NIfTI, MHA, NRRD) with exact geometry.

SimpleITK reads every supported format. NIfTI files that SimpleITK refuses (most often a
non-orthonormal direction matrix from a sloppy converter) are read again with nibabel.
Arrays come back in autoseg's (z, y, x) order; channels are stacked first: (c, z, y, x).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoseg.errors import ImageReadError
from autoseg.io.geometry import Geometry, geometry_from_affine

SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


def file_ending(path: str | Path) -> str:
    """The supported ending of `path` ('.nii.gz', '.mha', ...), or '' when unsupported."""
    name = Path(path).name.lower()
    return next((e for e in SUPPORTED_ENDINGS if name.endswith(e)), "")


def find_case_file(folder: str | Path, case_id: str, ending: str = "") -> Path | None:
    """CASE<ending> in `folder`, `ending` tried first and then every supported one; None if there is none
    (a label or prediction may be saved in another format than the scan)."""
    for candidate in dict.fromkeys((ending, *SUPPORTED_ENDINGS) if ending else SUPPORTED_ENDINGS):
        path = Path(folder) / f"{case_id}{candidate}"
        if path.is_file():
            return path
    return None


def read_header(path: str | Path) -> tuple[Geometry, int]:
    """Geometry and number of pixel components, without reading the voxels."""
    path = Path(path)
    _require_file(path)
    try:
        return _sitk_header(path)
    except RuntimeError:
        array, geometry, components = read_array(path)
        return geometry, components


def _sitk_header(path: Path) -> tuple[Geometry, int]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = reader.GetSize()
    if len(size) not in (2, 3):
        raise _dimension_error(path, len(size))
    geometry = Geometry(
        shape=tuple(int(s) for s in reversed(size)) if len(size) == 3 else (1, size[1], size[0]),
        file_spacing=tuple(float(s) for s in reader.GetSpacing()),
        origin=tuple(float(o) for o in reader.GetOrigin()),
        direction=tuple(float(d) for d in reader.GetDirection()),
    )
    return geometry, int(reader.GetNumberOfComponents())


def read_array(path: str | Path) -> tuple[np.ndarray, Geometry, int]:
    """Voxels in (z, y, x) order (a trailing component axis for vector pixels), geometry, components."""
    import SimpleITK as sitk

    path = Path(path)
    _require_file(path)
    _check_claimed_size(path)
    if file_ending(path) in (".nii", ".nii.gz"):
        nifti = _read_nifti(path)
        if nifti is not None:
            return nifti
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        if file_ending(path) in (".nii", ".nii.gz"):
            return _read_nibabel(path, err)
        raise ImageReadError(
            f"cannot read the file ({_first_line(err)})",
            path=path,
            hint="check that it is a complete, uncorrupted image; try opening it in ITK-SNAP or 3D Slicer",
        ) from err
    if image.GetDimension() not in (2, 3):
        raise _dimension_error(path, image.GetDimension())
    array = sitk.GetArrayFromImage(image)
    components = int(image.GetNumberOfComponentsPerPixel())
    if image.GetDimension() == 2:
        array = array[None]
    return array, Geometry.from_sitk(image), components


#: Deflate (gzip, zlib) never inflates more than ~1032 times: a header that claims more voxel bytes than
#: the file could hold at twice that is lying, and reading it would allocate the claim first.
MAX_INFLATION = 2048


def _check_claimed_size(path: Path) -> None:
    """ImageReadError when the header claims far more voxel bytes than the file can hold (a 452-byte file
    claiming 1024^3 float32 would otherwise cost 4 GiB before failing). Detached data files (.mhd, .nhdr)
    are measured where the header names one; bzip2-encoded NRRD is not bounded by deflate and is skipped."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return  # the reader below reports what is wrong
    size, components = reader.GetSize(), reader.GetNumberOfComponents()
    component_bytes = sitk.Image([1] * len(size), reader.GetPixelID(), components).GetSizeOfPixelComponent()
    claimed = math.prod(size) * components * component_bytes
    stored = _stored_bytes(path)
    if stored is not None and claimed > stored * MAX_INFLATION:
        raise ImageReadError(
            f"the header claims {'x'.join(map(str, size))} voxels ({claimed / 2**30:.1f} GiB) but the file holds "
            f"{stored} bytes",
            path=path, hint="the header is corrupt or the file is truncated: export or download it again")


def _stored_bytes(path: Path) -> int | None:
    """Bytes that hold the voxels: the file itself, or the detached data file its header names."""
    if file_ending(path) not in (".mhd", ".nhdr", ".nrrd"):
        return path.stat().st_size
    with open(path, "rb") as handle:
        header = handle.read(65536).decode("latin-1")
    if "bzip2" in header or "bz2" in header:
        return None
    if file_ending(path) == ".nrrd":
        return path.stat().st_size
    key = "ElementDataFile" if file_ending(path) == ".mhd" else "data file"
    for line in header.splitlines():
        name, _, value = line.partition("=" if key == "ElementDataFile" else ":")
        if name.strip().lower() in (key.lower(), "datafile"):
            if value.strip().upper() == "LOCAL":
                return path.stat().st_size
            data = path.parent / value.strip()
            return data.stat().st_size if data.is_file() else None
    return None


def _read_nifti(path: Path) -> tuple[np.ndarray, Geometry, int] | None:
    """NIfTI voxels read with nibabel, geometry from SimpleITK's header; None for vector pixels.

    SimpleITK (ITK 5.4) reads a truncated .nii.gz without error, padding it with zeros, and
    turns NaN and inf into 0 (ITK issue 6575, PR 6683); nibabel raises on the first and keeps
    the second. The geometry comes from SimpleITK, as for every other format, so NIfTI
    qform/sform precedence is ITK's everywhere. Headers SimpleITK refuses (a non-orthonormal
    direction) are read entirely with nibabel.
    """
    try:
        geometry, components = _sitk_header(path)
    except RuntimeError as err:
        return _read_nibabel(path, err)
    if components != 1:
        return None
    import nibabel as nib

    try:
        data = np.asanyarray(nib.load(str(path), mmap=False).dataobj)
    except Exception as err:
        raise ImageReadError(
            f"cannot read the file ({type(err).__name__}: {_first_line(err)})",
            path=path,
            hint="the file is truncated or corrupt: export or download it again",
        ) from err
    data = data.reshape(data.shape[:3]) if data.ndim > 3 and data.size == np.prod(data.shape[:3]) else data
    data = data.T[None] if data.ndim == 2 else data.transpose(2, 1, 0)
    if data.shape != geometry.shape:
        raise ImageReadError(f"voxel array {data.shape} disagrees with the header {geometry.shape}",
                             path=path, hint="the header is inconsistent: rewrite the file")
    return np.ascontiguousarray(data), geometry, 1


def _read_nibabel(path: Path, sitk_error: Exception) -> tuple[np.ndarray, Geometry, int]:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as err:
        raise ImageReadError(
            f"cannot read the file (SimpleITK: {_first_line(sitk_error)}; nibabel: {_first_line(err)})",
            path=path,
            hint="check that it is a complete, uncorrupted NIfTI file",
        ) from err
    if data.ndim != 3:
        raise _dimension_error(path, data.ndim)
    geometry = geometry_from_affine(image.affine, data.shape)
    return np.ascontiguousarray(data.transpose(2, 1, 0)), geometry, 1


def read_images(paths: Sequence[str | Path]) -> tuple[np.ndarray, Geometry]:
    """Read the channel files of one case into a float32 array (c, z, y, x) and its geometry."""
    arrays, geometries = [], []
    for path in paths:
        array, geometry, components = read_array(path)
        if components != 1:
            raise ImageReadError(
                f"image has {components} components per voxel (RGB or vector image)",
                path=path,
                hint="store each channel as its own file (CASE_0000, CASE_0001, ...)",
            )
        arrays.append(array.astype(np.float32, copy=False))
        geometries.append(geometry)
    for path, array in zip(paths[1:], arrays[1:]):
        if array.shape != arrays[0].shape:
            raise ImageReadError(
                f"channel shape {array.shape} differs from the first channel's {arrays[0].shape}",
                path=path,
                hint="all channels of a case must be on the same voxel grid; resample them first",
            )
    return np.stack(arrays), geometries[0]


def read_label(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a label map as integers (z, y, x); float files holding whole numbers are cast."""
    array, geometry, components = read_array(path)
    if components != 1:
        raise ImageReadError(
            f"label file has {components} components per voxel (an RGB image?)",
            path=path,
            hint="save labels as a single-component integer image with values 0, 1, 2, ...",
        )
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ImageReadError(
                "label file holds non-integer values",
                path=path,
                hint="labels must be whole numbers 0, 1, 2, ...; was an image saved as the label?",
            )
        array = array.astype(np.int16)
    return array, geometry


def write_image(array: np.ndarray, geometry: Geometry, path: str | Path) -> None:
    """Write one (z, y, x) array with `geometry`; the format follows the file ending."""
    import SimpleITK as sitk

    if geometry.dim == 2:
        array = array[0]
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    geometry.apply_to(image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written beside the target under a name with the same ending (the format follows it), then renamed:
    # an interrupted run never leaves a half-written image under the final name
    if file_ending(path) in (".mhd", ".nhdr"):  # detached data file: its name is inside the header
        _write_detached(image, path)
        return
    # a plain temporary name: ITK reads meaning into inner dots (".img" would make NIfTI write Analyze pairs)
    tmp = path.with_name(f".autoseg-partial-{os.getpid()}-{threading.get_ident()}{file_ending(path)}")
    try:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_detached(image: object, path: Path) -> None:
    """Header + data file pairs (.mhd/.raw, .nhdr/.raw.gz) written under their final names in a private
    folder beside the target, then moved: the data file first, the header last, so a header under the
    final name always points at complete data (a rerun that sees it may skip the case)."""
    import shutil

    import SimpleITK as sitk

    staging = path.parent / f".autoseg-partial-{os.getpid()}-{threading.get_ident()}"
    staging.mkdir(exist_ok=True)
    try:
        sitk.WriteImage(image, str(staging / path.name), useCompression=True)
        for written in sorted(staging.iterdir(), key=lambda f: f.name == path.name):
            os.replace(written, path.parent / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_label(array: np.ndarray, geometry: Geometry, path: str | Path) -> None:
    """Write a label map as uint8 (uint16 when labels exceed 255) with `geometry`."""
    dtype = np.uint8 if int(array.max(initial=0)) < 256 else np.uint16
    write_image(array.astype(dtype), geometry, path)


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise ImageReadError("file not found", path=path, hint="check the path and file name")


def _dimension_error(path: str | Path, dim: int) -> ImageReadError:
    return ImageReadError(
        f"image has {dim} dimensions; autoseg reads 2D and 3D images",
        path=path,
        hint="split 4D files into one 3D file per channel (CASE_0000, CASE_0001, ...)",
    )


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(err).__name__
