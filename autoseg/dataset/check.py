"""Dataset integrity check: report every problem of a raw dataset at once, never modify it.

`check_dataset` starts from the structural problems `scan_dataset` finds (dataset.json keys,
naming, missing files, numTraining) and then reads every case: unreadable files, channels or
label that do not share the voxel grid, label values that dataset.json does not declare (with
the usual causes named: 0/255 masks, RGB labels, intensity images saved as labels), and NaN or
infinite image voxels. Geometry is compared with tolerances so float noise in headers is not
reported. Each case is read once: voxels are needed anyway, because only decompressing a file
reveals truncation, and the geometry comes with them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoseg.dataset.contract import Case, Problem
from autoseg.dataset.load import scan_dataset
from autoseg.errors import ImageReadError
from autoseg.io import Geometry, read_array
from autoseg.log import get_logger, progress
from autoseg.runtime.processes import process_pool

#: |spacing difference| must exceed SPACING_RTOL * spacing + SPACING_ATOL (mm) to be reported.
SPACING_RTOL, SPACING_ATOL = 1e-3, 1e-4
#: |origin difference| in mm (per axis) must exceed this to be reported.
ORIGIN_ATOL = 1e-3
#: |direction cosine difference| (per matrix element) must exceed this to be reported.
DIRECTION_ATOL = 1e-4
#: A label file with more undeclared values than this is taken for an intensity image.
MANY_VALUES = 32

log = get_logger("dataset")


def check_dataset(root: str | Path, *, workers: int = 1) -> list[Problem]:
    """Every problem of the raw dataset at `root`, errors and warnings; [] when it is clean.

    `workers` > 1 reads cases in that many processes. The dataset is only read.
    """
    dataset, problems = scan_dataset(root)
    if dataset is None:
        return problems
    jobs = [(case, dataset.label_values, dataset.ignore_label) for case in dataset.cases]
    description = f"checking {dataset.name}"
    if workers > 1 and len(jobs) > 1:
        with process_pool(min(workers, len(jobs))) as pool:
            chunk = max(1, len(jobs) // (4 * workers))
            results = pool.map(_check_job, jobs, chunksize=chunk)
            for case_problems in progress(results, total=len(jobs), description=description):
                problems.extend(case_problems)
    else:
        for job in progress(jobs, total=len(jobs), description=description):
            problems.extend(_check_job(job))
    n_errors = sum(p.severity == "error" for p in problems)
    log.info("checked %d cases of %s: %d error(s), %d warning(s)", len(jobs), dataset.name,
             n_errors, len(problems) - n_errors)
    return problems


def check_case(case: Case, allowed: tuple[int, ...], ignore: int | None = None) -> list[Problem]:
    """Problems of one case: readability, shared voxel grid, label values, image values.

    `allowed` holds every value a label file may contain (Dataset.label_values); `ignore` is
    the ignore label, which does not count as foreground. Missing files are skipped here:
    `scan_dataset` reports them.
    """
    problems: list[Problem] = []
    reference: tuple[str, Geometry] | None = None
    for path in (p for p in case.images if Path(p).is_file()):
        geometry = _check_image(path, problems)
        if geometry is None:
            continue
        if reference is None:
            reference = (path, geometry)
        else:
            problems.extend(compare_geometry(geometry, path, *reference, what="channel"))
    if case.label is not None and Path(case.label).is_file():
        geometry = _check_label(case.label, allowed, ignore, problems)
        if geometry is not None and reference is not None:
            problems.extend(compare_geometry(geometry, case.label, *reference, what="label"))
    return problems


def _check_job(job: tuple[Case, tuple[int, ...], int | None]) -> list[Problem]:
    return check_case(*job)


def _read(path: str, problems: list[Problem]) -> tuple[np.ndarray, Geometry, int] | None:
    """Voxels (z, y, x), geometry and pixel components of one file, or None after a Problem.

    read_array reads NIfTI voxels with nibabel, so truncated files and NaN are seen here.
    """
    try:
        return read_array(path)
    except ImageReadError as err:
        problems.append(Problem(path, err.message, err.hint or "replace the file"))
    except Exception as err:  # any reader failure is a fault of this file, never a crash of the check
        problems.append(Problem(path, f"cannot read the file ({type(err).__name__}: {_short_message(err)})",
                                "the file is truncated or corrupt: export or download it again"))
    return None


def _check_image(path: str, problems: list[Problem]) -> Geometry | None:
    """Read one channel file; report vector pixels, NaN/inf and constant images."""
    result = _read(path, problems)
    if result is None:
        return None
    array, geometry, components = result
    if components != 1:
        problems.append(Problem(path, f"image has {components} components per voxel "
                                f"({_vector_kind(components)})", "store each channel as its own "
                                "single-component file (CASE_0000, CASE_0001, ...)"))
        return geometry
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        n_nan, n_inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        problems.append(Problem(path, f"image holds {n_nan} NaN and {n_inf} infinite voxel(s) "
                                f"of {array.size}", "replace them with a valid value (e.g. the background "
                                "intensity) when converting, e.g. numpy.nan_to_num; note that "
                                "SimpleITK silently reads NaN in NIfTI files as 0"))
    elif array.size and array.min() == array.max():
        problems.append(Problem(path, f"image is constant (every voxel is {array.flat[0]})",
                                "check that the right file was exported; a blank image teaches nothing",
                                "warning"))
    return geometry


def _check_label(path: str, allowed: tuple[int, ...], ignore: int | None,
                 problems: list[Problem]) -> Geometry | None:
    """Read one label file; report vector pixels, non-integer and undeclared values."""
    result = _read(path, problems)
    if result is None:
        return None
    array, geometry, components = result
    if components != 1:
        problems.append(Problem(path, f"label file has {components} components per voxel "
                                f"({_vector_kind(components)}), not one label value per voxel",
                                "save the label as a single-component (grayscale) integer image "
                                "with values " + ", ".join(map(str, allowed))))
        return geometry
    if not np.issubdtype(array.dtype, np.integer):
        fault = _non_integer_fault(array)
        if fault:
            problems.append(Problem(path, fault, "labels must be whole numbers "
                                    f"({', '.join(map(str, allowed))}); if the label was resampled, "
                                    "use nearest-neighbour interpolation; check that no image was "
                                    "saved as the label"))
            return geometry
    values, counts = _value_counts(array)
    problems.extend(_label_value_problems(path, values, counts, allowed, ignore))
    return geometry


def _non_integer_fault(array: np.ndarray) -> str:
    """Describe NaN or fractional voxels of a floating-point label, or '' if all are whole."""
    finite = np.isfinite(array)
    if not finite.all():
        return f"label file holds {int(array.size - finite.sum())} NaN or infinite voxel(s)"
    fractional = array != np.round(array)
    if fractional.any():
        examples = ", ".join(f"{v:g}" for v in np.unique(array[fractional])[:3])
        return (f"label file holds non-integer values in {int(fractional.sum())} voxel(s) "
                f"(e.g. {examples})")
    return ""


def _value_counts(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values and their voxel counts; bincount when the range allows (fast)."""
    if array.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    low, high = int(array.min()), int(array.max())
    if low >= 0 and high < 1 << 16:
        counts = np.bincount(array.ravel().astype(np.intp, copy=False), minlength=high + 1)
        values = np.flatnonzero(counts)
        return values, counts[values]
    values, counts = np.unique(array, return_counts=True)
    return values.astype(np.int64), counts


def _label_value_problems(path: str, values: np.ndarray, counts: np.ndarray, allowed: tuple[int, ...],
                          ignore: int | None) -> list[Problem]:
    present = [int(v) for v in values]
    extra = [v for v in present if v not in allowed]
    if not extra:
        if not any(v not in (0, ignore) for v in present):
            return [Problem(path, "label file holds only background (0)",
                            "check that the right file was saved; an empty case teaches only background",
                            "warning")]
        return []
    declared = ", ".join(map(str, allowed))
    if set(present) <= {0, 255} and 1 in allowed:
        return [Problem(path, "label file holds only 0 and 255: looks like a 0/255 binary mask",
                        "divide the label by 255 so the structure is 1 (e.g. (mask > 0).astype('uint8'))")]
    if len(extra) > MANY_VALUES:
        return [Problem(path, f"label file holds {len(present)} distinct values ({present[0]} .. "
                        f"{present[-1]}): looks like an intensity image, not a label map",
                        f"save the segmentation (values {declared}) as the label, not the scan")]
    shown = ", ".join(f"{v} ({int(counts[present.index(v)])} voxels)" for v in extra[:10])
    more = f" and {len(extra) - 10} more" if len(extra) > 10 else ""
    return [Problem(path, f"label value(s) {shown}{more} not declared in dataset.json labels",
                    f"declare them in dataset.json 'labels' or relabel the file; declared: {declared}")]


def compare_geometry(geometry: Geometry, path: str, ref_path: str, reference: Geometry, *,
                     what: str) -> list[Problem]:
    """Problems where `geometry` (of `path`) does not match the case's first channel.

    Shapes are reported in file order (x, y, z), as image viewers show them; spacing and
    origin in mm. Differences within the module tolerances are float noise and ignored.
    """
    name = Path(ref_path).name
    fix = ("resample it onto the image grid (nearest neighbour for labels)" if what == "label"
           else "resample all channels of the case onto one grid")
    if geometry.dim != reference.dim or geometry.shape != reference.shape:
        return [Problem(path, f"{what} size {_xyz(geometry)} differs from {name}'s {_xyz(reference)}", fix)]
    problems = []
    spacing_diff = np.abs(np.subtract(geometry.file_spacing, reference.file_spacing))
    if (spacing_diff > SPACING_RTOL * np.abs(reference.file_spacing) + SPACING_ATOL).any():
        problems.append(Problem(path, f"{what} spacing {_fmt(geometry.file_spacing)} mm differs from "
                                f"{name}'s {_fmt(reference.file_spacing)} mm (by up to "
                                f"{spacing_diff.max():.3g} mm)", fix))
    same_place = ("if the voxels already line up (check an overlay in ITK-SNAP or 3D Slicer), copy "
                  f"{name}'s header onto it (SimpleITK: CopyInformation); otherwise {fix}")
    origin_diff = float(np.abs(np.subtract(geometry.origin, reference.origin)).max())
    if origin_diff > ORIGIN_ATOL:
        problems.append(Problem(path, f"{what} origin {_fmt(geometry.origin)} differs from {name}'s "
                                f"{_fmt(reference.origin)} by up to {origin_diff:.3g} mm "
                                f"(tolerance {ORIGIN_ATOL:g} mm)", same_place))
    direction_diff = float(np.abs(np.subtract(geometry.direction, reference.direction)).max())
    if direction_diff > DIRECTION_ATOL:
        problems.append(Problem(path, f"{what} direction differs from {name}'s by up to "
                                f"{direction_diff:.3g} (tolerance {DIRECTION_ATOL:g})", same_place))
    return problems


def _xyz(geometry: Geometry) -> str:
    shape = tuple(reversed(geometry.shape))[: geometry.dim]
    return "x".join(map(str, shape)) + (" (x, y, z)" if geometry.dim == 3 else " (x, y)")


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _vector_kind(components: int) -> str:
    return "an RGB/RGBA colour image" if components in (3, 4) else "a vector image"


def _short_message(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no message"
