"""Fingerprint extraction: per-case analysis (one function, run in parallel) and aggregation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from autoseg.dataset.contract import Case, Dataset
from autoseg.errors import DatasetError
from autoseg.fingerprint.contract import CaseFingerprint, Fingerprint
from autoseg.fingerprint.intensity import case_rng, intensity_stats, sample_foreground
from autoseg.io import read_images, read_label
from autoseg.log import get_logger, progress
from autoseg.runtime.processes import process_pool

#: Foreground samples drawn over the whole dataset, split equally between cases. nnU-Net draws
#: 1e8; 1e7 gives the same 0.5/99.5 percentiles to well under 0.1 % of the intensity range
#: at a tenth of the memory and time.
DEFAULT_TOTAL_SAMPLES = 10_000_000
SEED = 1234

log = get_logger("fingerprint")


def nonzero_bounding_box(images: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Half-open box (start, stop) per spatial axis around voxels that are non-zero in any channel.

    images: (c, z, y, x). An all-zero image gives the full extent.
    """
    mask = np.any(images != 0, axis=0)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, mask.shape[axis]))
    return tuple(box)


def analyse_case(case: Case, *, samples: int, seed: int = SEED) -> tuple[CaseFingerprint, np.ndarray]:
    """Geometry after cropping to the non-zero region and foreground intensity samples (c, samples)."""
    images, geometry = read_images(case.images)
    box = nonzero_bounding_box(images)
    region = tuple(slice(start, stop) for start, stop in box)
    cropped = images[(slice(None), *region)]
    if case.label is not None:
        label, _ = read_label(case.label)
        if label.shape != images.shape[1:]:
            raise DatasetError(
                f"label shape {label.shape} differs from the image shape {images.shape[1:]}",
                path=case.label,
                hint=f"run `autoseg check {Path(case.label).parents[1]}` and fix the case",
            )
        foreground = label[region] > 0
    else:
        foreground = np.zeros(cropped.shape[1:], dtype=bool)
    drawn = sample_foreground(cropped, foreground, samples, case_rng(case.case_id, seed))
    shape = images.shape[1:]
    fingerprint = CaseFingerprint(
        case_id=case.case_id,
        spacing=geometry.array_spacing,
        shape=tuple(int(s) for s in shape),
        shape_after_crop=tuple(int(s) for s in cropped.shape[1:]),
        relative_size_after_crop=float(np.prod(cropped.shape[1:]) / np.prod(shape)),
    )
    return fingerprint, drawn


def extract_fingerprint(
    dataset: Dataset, *, workers: int = 1, total_samples: int = DEFAULT_TOTAL_SAMPLES
) -> Fingerprint:
    """Analyse every case (in `workers` processes) and pool the foreground statistics."""
    cases = list(dataset.cases)
    per_case = total_samples // max(len(cases), 1)
    results = list(progress(_run_cases(cases, per_case, workers), total=len(cases),
                            description="fingerprint"))
    results.sort(key=lambda item: item[0].case_id)
    pooled = np.concatenate([samples for _, samples in results], axis=1)
    crop_ratios = [fp.relative_size_after_crop for fp, _ in results]
    log.info("fingerprinted %d cases (%d foreground samples per case)", len(results), per_case)
    return Fingerprint(
        dataset_name=dataset.name,
        source_hash=dataset_hash(dataset),
        channel_names=dataset.channel_names,
        cases=tuple(fp for fp, _ in results),
        intensity=tuple(intensity_stats(pooled[c]) for c in range(len(dataset.channel_names))),
        median_relative_size_after_crop=float(np.median(crop_ratios)) if crop_ratios else 1.0,
        samples_per_case=per_case,
    )


def _run_cases(cases: list[Case], samples: int, workers: int):
    if workers <= 1 or len(cases) < 2:
        for case in cases:
            yield analyse_case(case, samples=samples)
        return
    with process_pool(workers) as pool:
        futures = [pool.submit(analyse_case, case, samples=samples) for case in cases]
        for future in futures:
            yield future.result()


def dataset_hash(dataset: Dataset) -> str:
    """Hash of dataset.json and every case file's name, size and modification time.

    Any edit, addition or removal changes it, so a cached fingerprint is never stale.
    """
    digest = hashlib.sha256()
    root = Path(dataset.root)
    digest.update((root / "dataset.json").read_bytes())
    for case in dataset.cases:
        for file in (*case.images, *([case.label] if case.label else [])):
            stat = Path(file).stat()
            digest.update(f"{file}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
