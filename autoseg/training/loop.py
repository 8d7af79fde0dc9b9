"""The training loop of one fold: epochs of SGD steps, a patch validation, records, checkpoints.

Resuming is exact: batch i of the loader depends only on (seed, i), checkpoints hold weights,
optimizer, scaler and the epoch, so a run interrupted after a checkpoint and continued ends with
the same weights as an uninterrupted one (bit for bit on CPU).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.errors import AutosegError
from autoseg.log import get_logger, progress
from autoseg.model_folder import ModelFolder, PreviousStage, load_checkpoint, save_checkpoint
from autoseg.planning.contract import Configuration
from autoseg.planning.identifier import DEFAULT_PLANS
from autoseg.preprocessing.previous import previous_dir
from autoseg.runtime.device import peak_memory
from autoseg.runtime.distributed import RuntimeContext, all_reduce_mean, all_reduce_sum, barrier, unwrap_model
from autoseg.runtime.signals import StopSignals
from autoseg.training.augment import resolve as resolve_augmentation
from autoseg.training.data import make_loader
from autoseg.training.progress import append_metrics, keep_metrics_until, plot_progress, read_metrics
from autoseg.training.settings import TrainingSettings, poly_lr, warmup_factor
from autoseg.training.setup import build_training_objects
from autoseg.training.steps import dice_from_counts, to_device, train_step, validation_step

log = get_logger("training")
EMA_WEIGHT = 0.9


@dataclass(frozen=True)
class FoldRun:
    """What one fold trains on and where it writes."""

    folder: ModelFolder
    fold: int | str
    config: Configuration
    cache: Path
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    in_channels: int
    num_classes: int
    class_names: tuple[str, ...]
    regions: tuple[tuple[int, ...], ...] | None = None
    ignore_label: int | None = None
    #: A cascade stage's input besides the image (in_channels counts its one-hot channels).
    previous: PreviousStage | None = None
    #: The plans identifier (autoseg = the default plans): keys the cascade's previous-stage folder.
    plans_name: str = DEFAULT_PLANS

    @property
    def previous_dir(self) -> Path | None:
        """The previous stage's segmentations on this cache's grid (cascade only)."""
        if self.previous is None:
            return None
        return previous_dir(self.cache, self.previous.configuration, self.plans_name)


@dataclass
class TrainingState:
    """Mutable progress of a run; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    ema_dice: float | None = None
    best_ema_dice: float | None = None
    history: list[float] = field(default_factory=list)


def train_fold(run: FoldRun, settings: TrainingSettings, context: RuntimeContext, *, resume: bool = False
               ) -> TrainingState:
    """Train (or continue) one fold; returns the final state. Only rank 0 writes files."""
    fold_dir = run.folder.fold_dir(run.fold)
    checkpoints = _resumable_checkpoints(run)
    objects = build_training_objects(run, settings, context, initialise=not (resume and checkpoints))
    state = TrainingState()
    if resume:
        state = _restore(run, objects, settings, checkpoints)
    elif context.is_main and checkpoints:
        kept = _move_previous_run(fold_dir)
        log.warning("fold %s already had checkpoints: training it again from scratch; the previous run's "
                    "checkpoints and records are kept in %s (pass --continue to resume instead)", run.fold, kept)
    if state.epoch >= settings.epochs:
        log.info("fold %s is already trained for %d epochs; pass a larger --epochs to extend it",
                 run.fold, state.epoch)
        return state
    if context.is_main:
        fold_dir.mkdir(parents=True, exist_ok=True)
        for leftover in fold_dir.glob(".*.tmp"):  # a killed run's half-written checkpoint (the fold is locked)
            leftover.unlink(missing_ok=True)
        keep_metrics_until(fold_dir / "metrics.jsonl", state.epoch - 1)
    train_loader, val_loader = _loaders(run, settings, context, start_epoch=state.epoch)
    with StopSignals() as stop:
        try:
            while state.epoch < settings.epochs and not _stop_agreed(stop, context):
                record = _epoch(run, settings, context, objects, state, train_loader, val_loader)
                state.epoch += 1
                if context.is_main:
                    _record_and_save(run, settings, objects, state, record)
        finally:
            train_loader.close()
            val_loader.close()
    objects.check_replicas_identical()
    if state.epoch < settings.epochs:
        _save_and_stop(run, settings, context, objects, state, stop.requested or "a stop signal")
    barrier(context)
    return state


def _move_previous_run(fold_dir: Path) -> Path:
    """Move an earlier run's checkpoints, records and validation into fold_dir/previous_run_<UTC time>, so a
    fresh start never leaves a checkpoint a later --continue would resume, nor records of two runs mixed."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = fold_dir / f"previous_run_{stamp}"
    target.mkdir(exist_ok=True)
    for path in fold_dir.iterdir():
        if path.name.startswith("checkpoint_") or path.name in ("metrics.jsonl", "progress.png", "validation"):
            os.replace(path, target / path.name)
    return target


class TrainingStopped(AutosegError):
    """Training was asked to stop (SIGTERM / SIGUSR1) and saved its last finished epoch."""


def _stop_agreed(stop: StopSignals, context: RuntimeContext) -> bool:
    """Whether any process was asked to stop: every rank must leave the loop after the same epoch."""
    wanted = stop.requested is not None
    if not context.distributed:
        return wanted
    flag = torch.tensor(float(wanted), device=context.device)
    return bool(all_reduce_sum(flag, context).item() > 0)


def _save_and_stop(run: FoldRun, settings: TrainingSettings, context: RuntimeContext, objects: Any,
                   state: TrainingState, reason: str) -> None:
    latest = run.folder.checkpoint(run.fold, "latest")
    if context.is_main:
        save_checkpoint(latest, _payload(run, objects, state, settings))
    barrier(context)
    raise TrainingStopped(f"stopped by {reason} after epoch {state.epoch}/{settings.epochs}; the checkpoint holds "
                          "every finished epoch", path=latest,
                          hint=f"continue with `autoseg train ... {run.fold} --continue`")


def _loaders(run: FoldRun, settings: TrainingSettings, context: RuntimeContext, *, start_epoch: int):
    batch = settings.batch_size or run.config.batch_size
    per_rank = math.ceil(batch / context.world_size)
    if per_rank * context.world_size != batch and context.is_main:
        log.warning("batch size %d does not split over %d processes: each takes %d, so the batch is %d "
                    "(pass --batch-size as a multiple of the GPU count to keep it)", batch, context.world_size,
                    per_rank, per_rank * context.world_size)
    common = {"batch_size": per_rank, "oversample": settings.foreground_oversample,
              "deep_supervision": settings.deep_supervision, "previous_dir": run.previous_dir,
              "previous_values": run.previous.values if run.previous else ()}
    train = make_loader(run.cache, run.train_ids, run.config, augmentation=settings.augmentation,
                        workers=settings.workers, seed=settings.seed + 1_000_003 * context.rank,
                        start=start_epoch * settings.iterations_per_epoch, **common)
    val_ids = run.val_ids or run.train_ids
    val = make_loader(run.cache, val_ids, run.config, augmentation="none", workers=0,
                      seed=settings.seed + 7 + 1_000_003 * context.rank,
                      start=start_epoch * settings.val_iterations, **common)
    return train, val


def _epoch(run: FoldRun, settings: TrainingSettings, context: RuntimeContext, objects: Any,
           state: TrainingState, train_loader: Any, val_loader: Any) -> dict[str, Any]:
    started = time.perf_counter()
    lr = poly_lr(settings.initial_lr, state.epoch, settings.epochs, settings.poly_exponent)
    for group in objects.optimizer.param_groups:
        group["lr"] = lr
    objects.network.train()
    losses = []
    steps = progress(range(settings.iterations_per_epoch), total=settings.iterations_per_epoch,
                     description=f"epoch {state.epoch + 1}/{settings.epochs}")
    report_every = settings.iterations_per_epoch // 5 if settings.iterations_per_epoch >= 50 else 0
    first = state.epoch * settings.iterations_per_epoch
    for step in steps:
        if first + step <= settings.warmup_iterations:  # one more call after the warm-up restores lr
            for group in objects.optimizer.param_groups:
                group["lr"] = lr * warmup_factor(first + step, settings.warmup_iterations)
        batch = to_device(next(train_loader), context.device, channels_last=settings.channels_last)
        losses.append(train_step(objects.network, objects.optimizer, objects.loss, batch, scaler=objects.scaler,
                                 amp_dtype=context.amp_dtype, grad_clip=settings.grad_clip))
        if report_every and (step + 1) % report_every == 0 and context.is_main:
            seconds = (time.perf_counter() - started) / (step + 1)
            log.info("epoch %d: iteration %d/%d, loss %.4f, %.2f s per iteration", state.epoch + 1, step + 1,
                     settings.iterations_per_epoch, float(np.mean(losses[-report_every:])), seconds)
    train_seconds = time.perf_counter() - started
    memory, memory_kind = peak_memory(context.device)
    record: dict[str, Any] = {"epoch": state.epoch, "lr": lr, "train_loss": _mean(losses, context),
                              "iterations": settings.iterations_per_epoch, "train_seconds": train_seconds,
                              "peak_memory_gib": memory, "memory_kind": memory_kind}
    record.update(_validate(run, settings, context, objects, val_loader))
    mean_dice = float(np.nanmean(list(record["pseudo_dice"].values()))) if record["pseudo_dice"] else float("nan")
    if not math.isnan(mean_dice):
        previous = mean_dice if state.ema_dice is None else state.ema_dice
        state.ema_dice = EMA_WEIGHT * previous + (1 - EMA_WEIGHT) * mean_dice
    record["ema_dice"] = state.ema_dice
    record["epoch_seconds"] = time.perf_counter() - started
    return record


def _validate(run: FoldRun, settings: TrainingSettings, context: RuntimeContext, objects: Any,
              loader: Any) -> dict[str, Any]:
    if settings.val_iterations == 0:
        return {"pseudo_dice": {}}
    objects.network.eval()
    counts, losses = np.zeros((len(run.class_names), 3), np.int64), []
    for _ in range(settings.val_iterations):
        batch = to_device(next(loader), context.device, channels_last=settings.channels_last)
        loss, batch_counts = validation_step(objects.network, objects.loss, batch, amp_dtype=context.amp_dtype,
                                             regions=run.regions, num_classes=run.num_classes)
        losses.append(loss)
        counts += batch_counts
    if context.distributed:
        summed = torch.from_numpy(counts).to(context.device)
        all_reduce_sum(summed, context)
        counts = summed.cpu().numpy()
    dice = dice_from_counts(counts)
    return {"val_loss": _mean(losses, context),
            "pseudo_dice": {name: (None if math.isnan(v) else float(v)) for name, v in zip(run.class_names, dice)}}


def _mean(values: list[float], context: RuntimeContext) -> float:
    value = torch.tensor(float(np.mean(values)) if values else float("nan"), dtype=torch.float64)
    return float(all_reduce_mean(value.to(context.device), context))


def _record_and_save(run: FoldRun, settings: TrainingSettings, objects: Any, state: TrainingState,
                     record: dict[str, Any]) -> None:
    fold_dir = run.folder.fold_dir(run.fold)
    append_metrics(fold_dir / "metrics.jsonl", record)
    plot_progress(read_metrics(fold_dir / "metrics.jsonl"), fold_dir / "progress.png")
    remaining = (settings.epochs - state.epoch) * record["epoch_seconds"]
    dice = ", ".join(f"{k} {v:.3f}" for k, v in record["pseudo_dice"].items() if v is not None)
    log.info("epoch %d/%d: loss %.4f, val loss %s, pseudo-Dice %s, EMA %s, lr %.5f, %.1f s (ETA %.0f min)",
             state.epoch, settings.epochs, record["train_loss"], _fmt(record.get("val_loss")), dice or "-",
             _fmt(state.ema_dice), record["lr"], record["epoch_seconds"], remaining / 60)
    if state.ema_dice is not None and (state.best_ema_dice is None or state.ema_dice > state.best_ema_dice):
        state.best_ema_dice = state.ema_dice
        save_checkpoint(run.folder.checkpoint(run.fold, "best"), _payload(run, objects, state, settings))
    finished = state.epoch >= settings.epochs
    if finished or state.epoch % settings.checkpoint_every == 0:
        save_checkpoint(run.folder.checkpoint(run.fold, "latest"), _payload(run, objects, state, settings))
    if finished:
        save_checkpoint(run.folder.checkpoint(run.fold, "final"), _payload(run, objects, state, settings))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _payload(run: FoldRun, objects: Any, state: TrainingState, settings: TrainingSettings) -> dict[str, Any]:
    return {
        "network": unwrap_model(objects.network).state_dict(),
        "optimizer": objects.optimizer.state_dict(),
        "scaler": objects.scaler.state_dict(),
        "epoch": state.epoch,
        "total_epochs": settings.epochs,
        "ema_dice": state.ema_dice,
        "best_ema_dice": state.best_ema_dice,
        "torch_rng": torch.get_rng_state(),
        # the axes mirrored in training: the ones test-time augmentation may flip
        "mirror_axes": list(resolve_augmentation(settings.augmentation, run.config.patch_size).mirror_axes),
    }


def _resumable_checkpoints(run: FoldRun) -> list[Path]:
    """The fold's checkpoint_latest.pt / checkpoint_final.pt that exist: what --continue starts from."""
    return [path for path in (run.folder.checkpoint(run.fold, n) for n in ("latest", "final")) if path.is_file()]


def _restore(run: FoldRun, objects: Any, settings: TrainingSettings, checkpoints: list[Path]) -> TrainingState:
    """The newest of `checkpoints`, into the objects; a fresh state when there is none."""
    payloads = [load_checkpoint(p) for p in checkpoints]
    if not payloads:
        log.info("no checkpoint to continue from in %s: starting fold %s from scratch",
                 run.folder.fold_dir(run.fold), run.fold)
        return TrainingState()
    payload = max(payloads, key=lambda p: p["epoch"])
    objects.load(payload)
    torch.set_rng_state(payload["torch_rng"])
    if settings.epochs != payload["total_epochs"]:
        log.info("continuing at epoch %d with %d epochs in total (was %d): the schedule follows the new total",
                 payload["epoch"], settings.epochs, payload["total_epochs"])
    return TrainingState(epoch=payload["epoch"], ema_dice=payload["ema_dice"], best_ema_dice=payload["best_ema_dice"])
