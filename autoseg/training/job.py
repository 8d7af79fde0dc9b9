"""Glue from a resolved dataset and its plans to `train_fold`: splits, model folder, settings, log."""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from autoseg.dataset.contract import Dataset
from autoseg.errors import SettingsError
from autoseg.log import get_logger
from autoseg.model.families import family_of
from autoseg.model_folder import ModelFolder, network_in_channels, previous_stage
from autoseg.paths import DatasetLocation
from autoseg.planning.contract import Configuration, Plans
from autoseg.runtime.device import arithmetic_name, configure_threads, keep_freed_memory, seed_all
from autoseg.runtime.distributed import RuntimeContext, barrier, shutdown
from autoseg.runtime.lock import folder_lock
from autoseg.serialization import atomic_write, load_contract, read_json, save_contract
from autoseg.training.cascade import previous_sources, store_previous
from autoseg.training.loop import FoldRun, train_fold
from autoseg.training.progress import attach_log_file, detach_log_file
from autoseg.training.settings import TrainingSettings
from autoseg.training.setup import require_cache
from autoseg.training.splits import fold_cases, load_or_create_splits

log = get_logger("training")


def resolve_settings(folder: ModelFolder, overrides: dict[str, Any], *, resume: bool,
                     fold: int | str | None = None) -> TrainingSettings:
    """The fold's stored settings when resuming (so flags only change what they name), defaults otherwise.

    Each fold keeps its own fold_k/training.json: folds of one configuration may be trained with
    different flags, and one fold's flags must not leak into another. The worker count describes the
    machine, not the run, so a resumed run sizes it afresh unless --workers is given again.
    """
    base = TrainingSettings()
    stored = folder.fold_settings_file(fold) if fold is not None else folder.settings_file
    if resume and not stored.is_file() and folder.settings_file.is_file():
        stored = folder.settings_file  # a run from before per-fold settings
    if resume and stored.is_file():
        base = load_contract(stored, TrainingSettings, rerun="autoseg train (without --continue)")
        base = replace(base, workers=None, **_settings_before_fields(stored))
    unknown = set(overrides) - set(TrainingSettings.__dataclass_fields__)
    if unknown:
        raise SettingsError(f"unknown training setting(s): {sorted(unknown)}", hint="see `autoseg train --help`")
    return replace(base, **overrides).validated()


def for_network(settings: TrainingSettings, config: Configuration) -> TrainingSettings:
    """Settings the configuration's network family can train with: a family with a single output
    (no decoder levels) trains without deep supervision, whatever the flag says."""
    family = family_of(config.topology)
    if settings.deep_supervision and not family.deep_supervision:
        log.info("%s has a single output: training without deep supervision", family.name)
        return replace(settings, deep_supervision=False)
    return settings


#: Fields added after runs were stored without them, with the value those runs trained with.
OLD_BEHAVIOUR = {"init": "nnunet", "warmup_iterations": 0}


def _settings_before_fields(stored: Path) -> dict[str, Any]:
    """A run stored before a field existed continues with the behaviour it was trained with."""
    written = read_json(stored)
    return {name: value for name, value in OLD_BEHAVIOUR.items() if name not in written}


def fold_run(location: DatasetLocation, dataset: Dataset, plans: Plans, configuration: str,
             fold: int | str) -> FoldRun:
    if configuration not in plans.configurations:
        raise SettingsError(f"the plan has no configuration {configuration!r}",
                            hint=f"choose one of: {', '.join(plans.configurations)}")
    config = plans.configurations[configuration]
    ids = [case.case_id for case in dataset.cases]
    splits = load_or_create_splits(location.preprocessed, ids, extra=[location.raw])
    train_ids, val_ids = fold_cases(splits, fold, ids)
    labels = dataset.foreground_labels
    return FoldRun(
        folder=ModelFolder.for_run(location.results, configuration, plans.plans_name), fold=fold,
        config=config, cache=location.preprocessed / config.data_id, train_ids=tuple(train_ids),
        val_ids=tuple(val_ids), in_channels=network_in_channels(plans, config, dataset), num_classes=plans.num_classes,
        class_names=tuple(label.name for label in labels),
        regions=tuple(label.values for label in labels) if dataset.has_regions else None,
        ignore_label=dataset.ignore_label, previous=previous_stage(config, dataset), plans_name=plans.plans_name,
    )


def train_one_fold(location: DatasetLocation, dataset: Dataset, plans: Plans, configuration: str,
                   fold: int | str, *, overrides: dict[str, Any], device: str, resume: bool) -> Path:
    run = fold_run(location, dataset, plans, configuration, fold)
    require_cache(run)
    # one run per fold: under torchrun, rank 0 holds the lock for all ranks
    lock = folder_lock(run.folder.fold_dir(fold), f"training of {run.folder.root.name} fold {fold}") \
        if int(os.environ.get("RANK", "0")) == 0 else nullcontext()
    with lock:
        return _train_locked(run, location, dataset, plans, configuration, fold, overrides=overrides,
                             device=device, resume=resume)


def _train_locked(run: FoldRun, location: DatasetLocation, dataset: Dataset, plans: Plans, configuration: str,
                  fold: int | str, *, overrides: dict[str, Any], device: str, resume: bool) -> Path:
    sources = previous_sources(location, dataset, plans, run.previous.configuration) if run.previous else None
    settings = for_network(resolve_settings(run.folder, overrides, resume=resume, fold=fold), run.config)
    context = RuntimeContext.from_env(device, amp=settings.amp, precision=settings.precision)
    configure_threads(context.device)
    if context.device.type == "cpu":
        keep_freed_memory()
    seed_all(settings.seed + context.rank)
    if sources is not None and run.previous is not None:
        if context.is_main:
            store_previous(sources, cache=run.cache, stage=run.previous.configuration, plans=plans,
                           config_name=configuration)
        barrier(context)
    handler = None
    if context.is_main:
        run.folder.write_metadata(plans, dataset_json=Path(dataset.root) / "dataset.json", settings=settings)
        splits = location.preprocessed / "splits.json"
        atomic_write(run.folder.root / "splits.json", lambda tmp: shutil.copyfile(splits, tmp))
        run.folder.fold_dir(fold).mkdir(parents=True, exist_ok=True)
        save_contract(run.folder.fold_settings_file(fold), settings)
        handler = attach_log_file(run.folder.fold_dir(fold) / "training.log")
    try:
        log.info("training %s fold %s on %s (%d training, %d validation cases, %d process(es))", configuration,
                 fold, context.device, len(run.train_ids), len(run.val_ids), context.world_size)
        log.info("arithmetic: %s (--precision %s)", arithmetic_name(context.amp_dtype), settings.precision)
        train_fold(run, settings, context, resume=resume)
    finally:
        if handler is not None:
            detach_log_file(handler)
        shutdown(context)
    return run.folder.root
