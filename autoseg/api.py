"""The Python API: one function per command, each taking and returning typed contracts.

The CLI is a thin layer over these; scripts and notebooks call them directly.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from autoseg.dataset.contract import Dataset, Problem
from autoseg.errors import PlanError
from autoseg.fingerprint.contract import Fingerprint
from autoseg.log import get_logger
from autoseg.paths import DatasetLocation, resolve_dataset
from autoseg.planning.contract import Plans
from autoseg.serialization import load_contract, save_contract

log = get_logger("api")

FINGERPRINT_FILE = "fingerprint.json"
PLANS_FILE = "plans.json"


def example_dataset(
    out: str | Path, *, n_cases: int = 6, modality: str = "ct", anisotropic: bool = False,
    seed: int = 0, size: int = 48, overwrite: bool = False,
) -> Path:
    """Write the synthetic example dataset (nnU-Net raw layout) to `out` and return its folder."""
    from autoseg.dataset.synthetic import make_example_dataset

    return make_example_dataset(out, n_cases=n_cases, modality=modality, anisotropic=anisotropic,
                                seed=seed, size=size, overwrite=overwrite)


def check(dataset: str | Path, *, workers: int = 1) -> list[Problem]:
    """Every problem of a raw dataset (errors and warnings); an empty list means clean."""
    from autoseg.dataset.check import check_dataset

    return check_dataset(resolve_dataset(dataset).raw, workers=workers)


def load(dataset: str | Path) -> Dataset:
    """Parse a raw dataset (strict: raises DatasetError on structural problems)."""
    from autoseg.dataset.load import load_dataset

    return load_dataset(resolve_dataset(dataset).raw)


def fingerprint(dataset: str | Path, *, workers: int = 1, force: bool = False) -> Fingerprint:
    """The dataset's fingerprint, from cache unless the raw files changed or `force` is set."""
    location = resolve_dataset(dataset)
    return _fingerprint(location, load(location.raw), workers=workers, force=force, spec=dataset)


def _fingerprint(location: DatasetLocation, parsed: Dataset, *, workers: int, force: bool,
                 spec: str | Path) -> Fingerprint:
    from autoseg.fingerprint import dataset_hash, extract_fingerprint

    cache = location.preprocessed / FINGERPRINT_FILE
    if cache.is_file() and not force:
        cached = load_contract(cache, Fingerprint, rerun=f"autoseg fingerprint {spec} --force")
        if cached.source_hash == dataset_hash(parsed):
            log.info("fingerprint is up to date: %s", cache)
            return cached
        log.info("the raw dataset changed since the cached fingerprint: recomputing")
    result = extract_fingerprint(parsed, workers=workers)
    save_contract(cache, result)
    log.info("wrote %s", cache)
    return result


def plan(
    dataset: str | Path, *, memory_budget_gb: float = 8.0, workers: int = 1, force: bool = False
) -> Plans:
    """Plan every configuration for `dataset` and write plans.json beside the fingerprint."""
    from autoseg.planning import plan as make_plans

    location = resolve_dataset(dataset)
    parsed = load(location.raw)
    fp = _fingerprint(location, parsed, workers=workers, force=force, spec=dataset)
    result = make_plans(fp, parsed, memory_budget_gb=memory_budget_gb)
    save_contract(plans_path(location), result)
    shutil.copyfile(Path(parsed.root) / "dataset.json", location.preprocessed / "dataset.json")
    log.info("wrote %s", plans_path(location))
    return result


def preprocess(
    dataset: str | Path, *, configurations: tuple[str, ...] = ("3d_fullres",), workers: int = 1,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Preprocess the dataset for the planned configurations; returns configuration -> cache folder.

    Needs `plan` first. Finished cases are skipped unless `overwrite`; an interrupted run resumes.
    """
    from autoseg.fingerprint import dataset_hash
    from autoseg.preprocessing.run import preprocess_dataset

    location = resolve_dataset(dataset)
    plans = load_plans(location.raw)
    parsed = load(location.raw)
    if plans.fingerprint_hash != dataset_hash(parsed):
        log.warning("the raw dataset changed since it was planned: consider `autoseg plan %s --force`", dataset)
    return preprocess_dataset(parsed, plans, list(configurations), out_root=location.preprocessed,
                              workers=workers, overwrite=overwrite)


def train(
    dataset: str | Path, configuration: str, fold: int | str, *, overrides: dict[str, Any] | None = None,
    device: str = "auto", resume: bool = False,
) -> Path:
    """Train one fold of one configuration; returns the model folder.

    `overrides` sets TrainingSettings fields (epochs, initial_lr, ...). With `resume`, the stored
    settings of the run are the base, so `--continue --epochs 2000` extends a finished run.
    """
    from autoseg.training.job import train_one_fold

    location = resolve_dataset(dataset)
    return train_one_fold(location, load(location.raw), load_plans(location.raw), configuration, fold,
                          overrides=overrides or {}, device=device, resume=resume)


def plans_path(location: DatasetLocation) -> Path:
    return location.preprocessed / PLANS_FILE


def load_plans(dataset: str | Path) -> Plans:
    """Read the plans written by `plan`."""
    location = resolve_dataset(dataset)
    path = plans_path(location)
    if not path.is_file():
        raise PlanError("the dataset has not been planned yet", path=path, hint=f"run `autoseg plan {dataset}` first")
    return load_contract(path, Plans, rerun=f"autoseg plan {dataset}")
