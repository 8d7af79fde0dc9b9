"""Training data of a cascade stage: the previous stage's cross-validation predictions, on the case cache's grid.

3d_cascade_fullres learns from 3d_lowres segmentations the way it will see them at inference: predictions
of scans the lowres network did not train on. Those are the lowres cross-validation predictions
(`<results>/<dataset>/3d_lowres__<plans>/fold_k/validation/CASE<ending>`, written on the original grid
when fold k finishes). Each is mapped onto its case's 3d_fullres cache grid once and stored as
`<cache>/previous_3d_lowres/CASE.npy` (`previous_3d_lowres__<identifier>` for another plans identifier),
which the loader reads like the segmentation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoseg.dataset.contract import Dataset
from autoseg.errors import SettingsError
from autoseg.io.readers import read_label
from autoseg.log import get_logger, progress
from autoseg.model_folder import ModelFolder
from autoseg.paths import DatasetLocation
from autoseg.planning.contract import Plans
from autoseg.preprocessing.cache import case_files, read_properties
from autoseg.preprocessing.previous import previous_dir, previous_file, to_preprocessed_grid
from autoseg.serialization import atomic_write
from autoseg.training.splits import load_or_create_splits

log = get_logger("training")


def previous_sources(location: DatasetLocation, dataset: Dataset, plans: Plans, stage: str) -> dict[str, Path]:
    """Case id -> the previous stage's cross-validation prediction of it, for every training case.

    Raises SettingsError naming the folds whose predictions are missing and the command that makes them.
    """
    ids = [case.case_id for case in dataset.cases]
    splits = load_or_create_splits(location.preprocessed, ids, extra=[location.raw])
    folder = ModelFolder.for_run(location.results, stage, plans.plans_name)
    fold_of = {case_id: fold for fold, split in enumerate(splits) for case_id in split["val"]}
    sources: dict[str, Path] = {}
    missing: dict[int, list[str]] = {}
    for case_id in ids:
        if case_id not in fold_of:
            raise SettingsError(f"case {case_id} is in no fold's validation set, so {stage} has no cross-validation "
                                "prediction of it", path=location.preprocessed / "splits.json",
                                hint="use splits whose validation sets cover every case (delete splits.json to "
                                     "have autoseg make them)")
        source = folder.validation_dir(fold_of[case_id]) / f"{case_id}{dataset.file_ending}"
        if source.is_file():
            sources[case_id] = source
        else:
            missing.setdefault(fold_of[case_id], []).append(case_id)
    if missing:
        folds = sorted(missing)
        first = folds[0]
        commands = "; ".join(f"autoseg train {location.name} {stage} {fold}" for fold in folds)
        raise SettingsError(
            f"the cascade needs the {stage} cross-validation predictions of every case: fold(s) "
            f"{', '.join(map(str, folds))} of {stage} have not written theirs (e.g. {missing[first][0]})",
            path=folder.validation_dir(first), hint=f"train those folds first: {commands}")
    return sources


def store_previous(sources: dict[str, Path], *, cache: Path, stage: str, plans: Plans, config_name: str) -> int:
    """Map each prediction onto its case's cache grid (`<cache>/previous_<stage>/CASE.npy`), atomically;
    cases stored after both their prediction and their preprocessing are skipped. Returns how many were written."""
    config = plans.configurations[config_name]
    written = 0
    for case_id, source in progress(sources.items(), total=len(sources), description=f"gathering {stage}"):
        target = previous_file(cache, stage, case_id, plans.plans_name)
        properties_file = case_files(cache, case_id)["properties"]
        if target.is_file() and target.stat().st_mtime >= max(source.stat().st_mtime,
                                                               properties_file.stat().st_mtime):
            continue
        label, _ = read_label(source)
        seg = to_preprocessed_grid(label, read_properties(cache, case_id), plans=plans, config=config)
        atomic_write(target, lambda tmp, seg=seg: _save_npy(tmp, seg))
        written += 1
    log.info("%s predictions of %d case(s) on the %s grid (%d updated) in %s", stage, len(sources), config_name,
             written, previous_dir(cache, stage, plans.plans_name))
    return written


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array))
