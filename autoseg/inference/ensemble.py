"""Ensemble prediction folders: the mean of their class probabilities, turned into one label map per case.

Configurations are averaged as probabilities (folds of one model were already averaged as logits by the
predictor), as nnU-Net does. Every input must have been predicted with `--save-probabilities`, so that
CASE.npz lies beside each CASE<ending>; prediction.json says how channels become labels, and all inputs
must agree on it. The geometry of each written case is that of the first input's label file.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError
from autoseg.inference.export import LabelSemantics, probabilities_to_labels
from autoseg.inference.info import INFO_FILE, PredictionInfo, read_prediction_info, write_prediction_info
from autoseg.inference.run import probabilities_file, save_probabilities_file
from autoseg.io.readers import file_ending, read_header, write_label
from autoseg.log import get_logger, progress

log = get_logger("inference")
PROBABILITIES_HINT = "predict with --save-probabilities (CASE.npz beside every CASE file), then ensemble again"


class EnsembleError(AutosegError):
    """Prediction folders cannot be ensembled (no probabilities, other labels, no common case)."""


@dataclass(frozen=True)
class _Job:
    case_id: str
    npz: tuple[Path, ...]  # one per input folder, in input order
    geometry_from: Path  # the first input's label file of this case
    target: Path


def ensemble_folders(
    inputs: Sequence[Path], output: Path, *, overwrite: bool = False, save_probabilities: bool = False,
    workers: int = 1,
) -> list[str]:
    """Average the probabilities of every case present in all `inputs` and write the labels to `output`.

    Writes CASE<ending> (the first input's ending and geometry), prediction.json (sources = the input
    folders) and, with `save_probabilities`, the mean as CASE.npz. Cases already in `output` are skipped
    unless `overwrite`. Returns the case ids written, sorted. `workers` threads run cases in parallel.
    """
    folders = [Path(folder) for folder in inputs]
    output = Path(output)
    if len(folders) < 2:
        raise EnsembleError(f"{len(folders)} prediction folder(s) given; an ensemble needs at least two",
                            path=folders[0] if folders else None, hint="pass two or more folders to -i")
    if output.resolve() in {folder.resolve() for folder in folders}:
        raise EnsembleError("the output folder is one of the inputs", path=output, hint="write to a new folder")
    infos = [_read_info(folder) for folder in folders]
    _check_same_semantics(folders, infos)
    jobs = _plan_jobs(folders, output, overwrite=overwrite, save_probabilities=save_probabilities)
    output.mkdir(parents=True, exist_ok=True)
    folds = tuple(dict.fromkeys(fold for info in infos for fold in info.folds))
    write_prediction_info(output, PredictionInfo(labels=infos[0].labels, region_values=infos[0].region_values,
                                                 sources=tuple(str(f.resolve()) for f in folders), folds=folds,
                                                 probabilities=save_probabilities))
    semantics = LabelSemantics(infos[0].region_values)
    if workers <= 1 or len(jobs) < 2:
        for job in progress(jobs, total=len(jobs), description="ensembling"):
            _ensemble_case(job, semantics, save_probabilities)
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="autoseg-ensemble") as pool:
            futures = [pool.submit(_ensemble_case, job, semantics, save_probabilities) for job in jobs]
            for future in progress(futures, total=len(futures), description="ensembling"):
                future.result()
    log.info("ensembled %d case(s) of %d folders into %s", len(jobs), len(folders), output)
    return sorted(job.case_id for job in jobs)


def _read_info(folder: Path) -> PredictionInfo:
    if not folder.is_dir():
        raise EnsembleError("prediction folder not found", path=folder, hint="check the paths given to -i")
    if not (folder / INFO_FILE).is_file():
        raise EnsembleError(f"no {INFO_FILE}: not a folder written by autoseg predict", path=folder,
                            hint=PROBABILITIES_HINT)
    return read_prediction_info(folder)


def _check_same_semantics(folders: list[Path], infos: list[PredictionInfo]) -> None:
    """All inputs must map channels to the same labels, or averaging their channels means nothing."""
    first = infos[0]
    for folder, info in zip(folders[1:], infos[1:]):
        if info.labels != first.labels or info.region_values != first.region_values:
            raise EnsembleError(
                f"labels differ from those of {folders[0]} (labels {_describe(info)} vs {_describe(first)})",
                path=folder, hint="ensemble only predictions of models trained on the same dataset labels")


def _describe(info: PredictionInfo) -> str:
    names = ", ".join(f"{label.name}={list(label.values)}" for label in info.labels)
    return names + (f"; regions written as {list(info.region_values)}" if info.region_values else "")


def _case_files(folder: Path) -> tuple[dict[str, Path], set[str]]:
    """(case id -> label file, case ids with CASE.npz) of one prediction folder."""
    labels, npz = {}, set()
    for path in folder.iterdir():
        if path.name.startswith(".") or not path.is_file():
            continue
        ending = file_ending(path)
        if ending:
            labels[path.name[: -len(ending)]] = path
        elif path.suffix == ".npz":
            npz.add(path.stem)
    return labels, npz


def _plan_jobs(folders: list[Path], output: Path, *, overwrite: bool, save_probabilities: bool) -> list[_Job]:
    """The cases to write: present (with probabilities) in every input, not already in `output`."""
    listed = [_case_files(folder) for folder in folders]
    for folder, (_, npz) in zip(folders, listed):
        if not npz:
            raise EnsembleError("the folder holds no probabilities (CASE.npz files)", path=folder,
                                hint=PROBABILITIES_HINT)
    every = set().union(*(npz for _, npz in listed))
    common = set.intersection(*(npz for _, npz in listed))
    if not common:
        raise EnsembleError("the input folders have no case in common", path=folders[0],
                            hint="ensemble predictions of the same scans")
    for folder, (_, npz) in zip(folders, listed):
        lacking = sorted(every - npz)
        if lacking:
            log.warning("%s lacks %d case(s) the other inputs have; they are not ensembled: %s", folder,
                        len(lacking), ", ".join(lacking[:5]) + (" ..." if len(lacking) > 5 else ""))
    jobs, skipped = [], 0
    for case_id in sorted(common):
        source = next((labels[case_id] for labels, _ in listed if case_id in labels), None)
        if source is None:
            raise EnsembleError(f"case {case_id} has probabilities but no label file in any input", path=folders[0],
                                hint="the label file gives the geometry: predict the case again")
        target = output / f"{case_id}{file_ending(source)}"
        if target.exists() and not overwrite and (not save_probabilities or probabilities_file(target).exists()):
            skipped += 1
            continue
        jobs.append(_Job(case_id, tuple(folder / f"{case_id}.npz" for folder in folders), source, target))
    if skipped:
        log.info("%d case(s) already ensembled in %s (pass --overwrite to redo them)", skipped, output)
    return jobs


def _ensemble_case(job: _Job, semantics: LabelSemantics, save_probabilities: bool) -> None:
    geometry, _ = read_header(job.geometry_from)
    total: np.ndarray | None = None
    for path in job.npz:
        probabilities = load_probabilities(path)
        if total is None:
            total = probabilities.astype(np.float32)
        elif probabilities.shape != total.shape:
            raise EnsembleError(f"probabilities of shape {probabilities.shape} differ from {total.shape} in "
                                f"{job.npz[0]}", path=path, hint="ensemble predictions of the same scans")
        else:
            total += probabilities
    assert total is not None
    mean = total / len(job.npz)
    if mean.shape[1:] != geometry.shape:
        raise EnsembleError(f"probabilities {mean.shape[1:]} (z, y, x) do not match the label file's grid "
                            f"{geometry.shape} ({job.geometry_from})", path=job.npz[0],
                            hint="predict the case again: its files come from different runs")
    if save_probabilities:
        save_probabilities_file(probabilities_file(job.target), mean)
    write_label(probabilities_to_labels(mean, semantics), geometry, job.target)


def load_probabilities(path: Path) -> np.ndarray:
    """The (c, z, y, x) probabilities of a CASE.npz written by predict or ensemble."""
    try:
        with np.load(path) as data:
            return np.asarray(data["probabilities"])
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise EnsembleError(f"cannot read the probabilities ({type(err).__name__}: {err})", path=path,
                            hint=PROBABILITIES_HINT) from err
