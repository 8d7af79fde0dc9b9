"""The on-disk case cache: one folder per configuration data id, four files per case.

    <case>.npy            data, float32 (c, z, y, x), memory-mapped for random patch reads
    <case>_seg.npy        segmentation, int8/int16 (z, y, x), OUTSIDE (-1) outside the body
    <case>_locations.npz  sampled foreground coordinates per class (n, 3) int32
    <case>.json           CaseProperties, written last: its presence marks the case as done

Every file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written case that looks finished.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoseg.preprocessing.contract import CaseProperties
from autoseg.serialization import atomic_write, load_contract, save_contract

RERUN = "autoseg preprocess DATASET --overwrite"


def case_files(folder: Path, case_id: str) -> dict[str, Path]:
    return {
        "data": folder / f"{case_id}.npy",
        "seg": folder / f"{case_id}_seg.npy",
        "locations": folder / f"{case_id}_locations.npz",
        "properties": folder / f"{case_id}.json",
    }


def write_case(
    folder: Path, properties: CaseProperties, *, data: np.ndarray, seg: np.ndarray,
    locations: dict[int, np.ndarray],
) -> None:
    """Write one case atomically; the properties file goes last."""
    files = case_files(folder, properties.case_id)
    atomic_write(files["data"], lambda tmp: _save_npy(tmp, data))
    atomic_write(files["seg"], lambda tmp: _save_npy(tmp, seg))
    arrays = {str(key): value for key, value in locations.items()}
    atomic_write(files["locations"], lambda tmp: _save_npz(tmp, arrays))
    save_contract(files["properties"], properties)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array))


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def is_done(folder: Path, case_id: str, source_hash: str | tuple[str, ...]) -> bool:
    """True when the case was finished from the same raw files and plan (any of the given hashes)."""
    files = case_files(folder, case_id)
    if not all(path.is_file() for path in files.values()):
        return False
    try:
        properties = load_contract(files["properties"], CaseProperties, rerun=RERUN)
    except Exception:
        return False
    accepted = (source_hash,) if isinstance(source_hash, str) else source_hash
    return properties.source_hash in accepted


def read_properties(folder: Path, case_id: str) -> CaseProperties:
    return load_contract(case_files(folder, case_id)["properties"], CaseProperties, rerun=RERUN)


def read_case(
    folder: Path, case_id: str, *, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray, CaseProperties, dict[int, np.ndarray]]:
    """Data, segmentation (memory-mapped by default), properties and class locations."""
    files = case_files(folder, case_id)
    mode = "r" if mmap else None
    data = np.load(files["data"], mmap_mode=mode)
    seg = np.load(files["seg"], mmap_mode=mode)
    with np.load(files["locations"]) as stored:
        locations = {int(key): stored[key] for key in stored.files}
    return data, seg, read_properties(folder, case_id), locations
