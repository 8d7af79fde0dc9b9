"""Preprocess a whole dataset for one or more configurations, in parallel and resumably."""

from __future__ import annotations

import glob
import hashlib
import json
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path

from autoseg.dataset.contract import Case, Dataset
from autoseg.errors import SettingsError
from autoseg.io import read_images, read_label
from autoseg.log import get_logger, progress
from autoseg.planning.contract import Configuration, Plans
from autoseg.preprocessing.cache import case_files, is_done, write_case
from autoseg.preprocessing.case import case_properties, preprocess_arrays
from autoseg.runtime.lock import part_lock
from autoseg.runtime.parts import WHOLE, Part
from autoseg.runtime.processes import process_pool
from autoseg.serialization import to_jsonable

log = get_logger("preprocessing")


@dataclass(frozen=True)
class CaseJob:
    """Everything one worker needs for one case (picklable)."""

    case: Case
    folder: Path
    plans: Plans
    config: Configuration
    classes: dict[int, tuple[int, ...]]
    source_hash: str


def training_classes(dataset: Dataset) -> dict[int, tuple[int, ...]]:
    """Class key -> label values: each plain label is its own key; regions are numbered from 1."""
    if dataset.has_regions:
        return {i + 1: label.values for i, label in enumerate(dataset.foreground_labels)}
    return {label.values[0]: label.values for label in dataset.foreground_labels}


def case_hash(case: Case, plans: Plans, config: Configuration, *, legacy: bool = False) -> str:
    """Changes whenever the case's files or anything of the plan that shapes its arrays changes: the
    configuration's spacing, normalisation and resampling, the plan's transpose and intensity statistics.
    Not the network: plans identifiers with equal arrays share one cache. `legacy`: the hash of caches
    written before network families (it covered the whole configuration), still accepted by `is_done`."""
    digest = hashlib.sha256()
    arrays = {"config": to_jsonable(config)} if legacy else {
        "spacing": config.spacing, "normalization": config.normalization,
        "use_mask_for_norm": config.use_mask_for_norm, "resampling": to_jsonable(config.resampling)}
    recipe = {**arrays, "transpose": plans.transpose_forward, "intensity": to_jsonable(plans.intensity)}
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    for file in (*case.images, *([case.label] if case.label else [])):
        stat = Path(file).stat()
        digest.update(f"{Path(file).name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def process_case(job: CaseJob) -> str:
    """Read, preprocess and write one case; returns its id."""
    images, geometry = read_images(job.case.images)
    label = read_label(job.case.label)[0] if job.case.label else None
    result = preprocess_arrays(images, label, geometry, plans=job.plans, config=job.config,
                               classes=job.classes)
    properties = case_properties(job.case.case_id, images.shape, geometry, result, plans=job.plans,
                                 source_hash=job.source_hash)
    write_case(job.folder, properties, data=result.data, seg=result.seg, locations=result.locations)
    return job.case.case_id


def preprocess_dataset(
    dataset: Dataset, plans: Plans, configurations: list[str], *, out_root: Path, workers: int = 1,
    overwrite: bool = False, part: Part = WHOLE,
) -> dict[str, Path]:
    """Preprocess every case (or `part`'s share of them) for each configuration; returns configuration ->
    cache folder.

    Finished cases (same files, same plan) are skipped unless `overwrite`; an interrupted run
    resumes where it stopped. Peak memory is that of `workers` cases at a time. Parts of one split
    (`--part I/N`) run side by side on the same cache.
    """
    cases = part.select(sorted(dataset.cases, key=lambda case: case.case_id))
    folders: dict[str, Path] = {}
    prepared: set[str] = set()  # data ids already done in this call (the cascade shares 3d_fullres data)
    for name in configurations:
        if name not in plans.configurations:
            known = ", ".join(plans.configurations)
            raise SettingsError(f"the plan has no configuration {name!r}", hint=f"choose one of: {known}")
        config = plans.configurations[name]
        folder = out_root / config.data_id
        folders[name] = folder
        if config.data_id in prepared:
            continue
        prepared.add(config.data_id)
        with part_lock(folder, f"preprocessing into {folder.name}", part):  # the leftover-cleaner must not race
            _remove_leftovers(folder, None if part.whole else [case.case_id for case in cases])
            jobs = _pending_jobs(dataset, cases, plans, config, folder, overwrite=overwrite)
            share = "" if part.whole else f" (part {part})"
            log.info("%s: %d of %d cases%s to preprocess into %s", name, len(jobs), len(cases), share, folder)
            for _ in progress(_run(jobs, workers), total=len(jobs), description=f"preprocess {name}"):
                pass
    return folders


def _remove_leftovers(folder: Path, case_ids: list[str] | None) -> None:
    """Delete temporary files a killed run left behind (a clean exit removes its own): of every case, or
    only of `case_ids` (a part must not delete the files other parts are writing)."""
    if case_ids is None:
        leftovers = list(folder.glob(".*.tmp"))
    else:
        leftovers = [tmp for case_id in case_ids for file in case_files(folder, case_id).values()
                     for tmp in folder.glob(f".{glob.escape(file.name)}.*.tmp")]
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)


def _pending_jobs(dataset: Dataset, cases: list[Case], plans: Plans, config: Configuration, folder: Path, *,
                  overwrite: bool) -> list[CaseJob]:
    classes = training_classes(dataset)
    jobs = []
    for case in cases:
        source = case_hash(case, plans, config)
        accepted = (source, case_hash(case, plans, config, legacy=True))
        if overwrite or not is_done(folder, case.case_id, accepted):
            jobs.append(CaseJob(case, folder, plans, config, classes, source))
    return jobs


def _run(jobs: list[CaseJob], workers: int):
    """Yield case ids as they finish, at most `workers` cases in flight."""
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            yield process_case(job)
        return
    with process_pool(workers) as pool:
        queue = list(reversed(jobs))
        running: set[Future[str]] = set()
        while queue or running:
            while queue and len(running) < workers:
                running.add(pool.submit(process_case, queue.pop()))
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
