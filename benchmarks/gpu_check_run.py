"""Sections of benchmarks/gpu_check.py that run autoseg's training machinery: the environment, the
loader's throughput against the GPU, DDP through torchrun, and a short real training."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from gpu_check_common import Check, PlanCase, attempt, data_plan_cases, fold_run, gib, outside_allocator_bytes, row

from autoseg.planning.contract import Plans
from autoseg.runtime.cpus import allotted_cpus, default_workers
from autoseg.runtime.device import amp_dtype, seed_all
from autoseg.runtime.distributed import RuntimeContext
from autoseg.training.data import make_loader
from autoseg.training.loop import train_fold
from autoseg.training.progress import read_metrics
from autoseg.training.settings import TrainingSettings
from autoseg.training.splits import fold_cases, load_or_create_splits

HERE = Path(__file__).resolve().parent
#: Seconds the training section leaves for the prediction section after it.
PREDICTION_RESERVE_S = {True: 20.0, False: 60.0}  # by check.quick


def cached_case_ids(cache: Path) -> list[str]:
    """Case ids of a configuration's cache (each finished case has <id>.json)."""
    return sorted(path.stem for path in cache.glob("*.json"))


def plans_with(case: PlanCase) -> Plans:
    """The case's plans with its (possibly shrunk) configuration, for a model folder that rebuilds it."""
    configurations = {**case.plans.configurations, case.config.name: case.config}
    return dataclasses.replace(case.plans, configurations=configurations)


# ---------------------------------------------------------------- environment


def environment(check: Check) -> dict[str, Any]:
    """Versions, the device, the CPUs autoseg sizes its workers from, and the CUDA context's size."""
    from autoseg.runtime.report import environment_report

    report = environment_report()
    cpus = allotted_cpus()
    rows = [row("torch", torch.__version__, f"CUDA {report.torch_cuda}, cuDNN {report.cudnn}, python "
                f"{report.python}, autoseg {report.autoseg}"),
            row("CPUs", f"{cpus} allotted", f"{report.cpus_host} on the host; autoseg's default loader workers: "
                f"{default_workers(cpus)}", cpus=cpus, default_workers=default_workers(cpus))]
    if check.cuda:
        rows.insert(0, _gpu_row(check))
    amp = amp_dtype(check.device, purpose="train")
    rows.append(row("autoseg precision", str(amp).replace("torch.", "") if amp else "fp32",
                    f"cudnn.benchmark {torch.backends.cudnn.benchmark}, cudnn TF32 {torch.backends.cudnn.allow_tf32}, "
                    f"matmul TF32 {torch.backends.cuda.matmul.allow_tf32}"))
    return {"rows": rows, "report": dataclasses.asdict(report)}


def _gpu_row(check: Check) -> dict[str, Any]:
    torch.zeros(1, device=check.device)  # make sure the context exists
    context = outside_allocator_bytes(check)
    props = torch.cuda.get_device_properties(check.device)
    total = props.total_memory
    return row("GPU", props.name, f"{gib(total):.1f} GiB, capability {props.major}.{props.minor}, "
               f"{props.multi_processor_count} SMs; bare CUDA context {gib(context):.2f} GiB (device memory in use "
               "beyond the caching allocator)", total_gb=gib(total), cuda_context_gb=gib(context),
               gpu_name=props.name)


# ---------------------------------------------------------------- loader


def _worker_counts(check: Check) -> list[int]:
    default = default_workers()
    if not check.cuda:
        return [0, 1]
    if check.quick:
        return sorted({2, default})
    return sorted({1, 2, 4, 8, default})


def loader(check: Check) -> dict[str, Any]:
    """Batches per second of autoseg's loader (default augmentation) per worker count, against the GPU's
    iterations per second for the same plan (train_steps, bf16): the workers needed not to starve it."""
    case = data_plan_cases(check)[0]
    cache = check.data / case.config.data_id
    ids = cached_case_ids(cache)
    rows: list[dict[str, Any]] = []
    for workers in _worker_counts(check):
        attempt(rows, f"{case.shape}, {workers} workers", _loader_row, check, case, ids, workers)
    gpu = check.state.get("step_rate", {}).get(case.label)
    rates = {r["workers"]: r["batches_per_s"] for r in rows if "batches_per_s" in r}
    if gpu and rates:
        rows.append(_needed_row(case, gpu, rates))
    return {"rows": rows}


def _loader_row(check: Check, case: PlanCase, ids: list[str], workers: int) -> dict[str, Any]:
    minimum = (3, 0.0) if not check.cuda else (10, 1.0) if check.quick else (30, 3.0)
    with make_loader(check.data / case.config.data_id, ids, case.config, workers=workers, seed=0) as batches:
        for _ in range(2 + workers):  # the workers' start and first batches
            next(batches)
        start, count = time.perf_counter(), 0
        while count < minimum[0] or time.perf_counter() - start < minimum[1]:
            next(batches)
            count += 1
        rate = count / (time.perf_counter() - start)
    where = "in the main process" if workers == 0 else f"{workers} worker processes"
    return row(f"{case.shape}, loader with {workers} workers", f"{rate:.1f} batches/s", f"{where}, {count} batches",
               workers=workers, batches_per_s=rate)


def _needed_row(case: PlanCase, gpu_rate: float, rates: dict[int, float]) -> dict[str, Any]:
    enough = [w for w, r in sorted(rates.items()) if r >= gpu_rate]
    busiest = max((w for w in rates if w > 0), default=max(rates))
    per_worker = rates[busiest] / max(busiest, 1)
    estimate = math.ceil(gpu_rate / per_worker)
    figure = f"{enough[0]} workers" if enough else f"about {estimate} workers (extrapolated)"
    return row(f"{case.shape}, workers needed", figure,
               f"GPU step rate {gpu_rate:.1f} it/s (bf16, synthetic batch); {per_worker:.1f} batches/s per worker "
               f"at {busiest} workers", gpu_it_per_s=gpu_rate, workers_needed=enough[0] if enough else estimate,
               extrapolated=not enough)


# ---------------------------------------------------------------- DDP


def ddp(check: Check) -> dict[str, Any]:
    """autoseg's training loop under torchrun: 1 process (NCCL on CUDA, gloo on CPU), and 2 processes on
    one GPU (NCCL may refuse two ranks on one device: that is recorded, not fatal)."""
    rows: list[dict[str, Any]] = []
    for processes in (1,) if check.quick or not check.cuda else (1, 2):
        attempt(rows, f"torchrun, {processes} process(es)", _ddp_row, check, processes)
    return {"rows": rows}


def _ddp_row(check: Check, processes: int) -> dict[str, Any]:
    out = check.work / f"ddp_{processes}.json"
    out.unlink(missing_ok=True)
    shutil.rmtree(check.work / f"ddp_{processes}", ignore_errors=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(HERE / "gpu_check_ddp.py"), "--data", str(check.data), "--device", check.device.type,
               "--work", str(check.work / f"ddp_{processes}"), "--out", str(out), *(["--tiny"] if check.tiny else [])]
    timeout = max(10.0, min(120.0, check.remaining()))
    started = time.perf_counter()
    code, log = _run_group(command, timeout, threads=1 if check.tiny else None)
    seconds = time.perf_counter() - started
    if code != 0 or not out.is_file():
        raise RuntimeError(f"exit code {code} after {seconds:.0f} s: {_last_error(log)}")
    result = json.loads(out.read_text())
    group = " (a DDP group of one, which autoseg alone would not form)" if result["group_of_one_forced"] else ""
    return row(f"torchrun, {processes} process(es), {result['backend']}", f"ok in {seconds:.1f} s",
               f"train_fold under DDP{group}: {result['iterations']} iterations + validation per rank, loss "
               f"{result['train_loss']:.3f}, replicas identical; {result['train_seconds']:.1f} s in train_fold",
               wall_s=seconds, **result)


def _run_group(command: list[str], timeout: float, *, threads: int | None) -> tuple[int | None, str]:
    """Run `command` in its own process group; kill the whole group when it outlives `timeout`."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            output, _ = proc.communicate(timeout=timeout)
            return proc.returncode, output
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            return None, f"timed out after {timeout:.0f} s\n{output}"


def _last_error(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line or "timed out" in line]
    return " | ".join((errors or lines)[-3:])[:600]


# ---------------------------------------------------------------- short real training


def _training_settings(check: Check) -> TrainingSettings:
    if not check.cuda:
        return TrainingSettings(epochs=1, iterations_per_epoch=2, val_iterations=1, workers=0)
    if check.quick:
        return TrainingSettings(epochs=1, iterations_per_epoch=25, val_iterations=5)
    return TrainingSettings(epochs=1)  # a real epoch: 250 iterations and 50 validation batches


def training(check: Check) -> dict[str, Any]:
    """`train_fold` on the dataset's fold 0: one epoch, then as many more as fit the time budget (continued
    from the checkpoint, the schedule over the new total); real it/s and the validation pseudo-Dice."""
    case = data_plan_cases(check)[0]
    cache = check.data / case.config.data_id
    ids = cached_case_ids(cache)
    train_ids, val_ids = fold_cases(load_or_create_splits(check.data, ids), 0, ids)
    folder = check.work / "model" / f"{case.config.name}__{case.plans.plans_name}"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run, not the last check's
    run = fold_run(case, folder=folder, cache=cache, train_ids=tuple(train_ids), val_ids=tuple(val_ids))
    settings = _training_settings(check)
    context = RuntimeContext(device=check.device, amp_dtype=amp_dtype(check.device))
    budget = min(check.train_seconds, check.remaining() - PREDICTION_RESERVE_S[check.quick])
    started = time.perf_counter()
    seed_all(settings.seed)
    train_fold(run, settings, context)
    first = read_metrics(run.folder.fold_dir(0) / "metrics.jsonl")[-1]["epoch_seconds"]
    total = 1 + max(0, int((budget - (time.perf_counter() - started)) // first))
    total = min(total, 2) if check.tiny else total  # CI: one continued epoch shows --continue works
    if total > 1:
        train_fold(run, settings.with_epochs(total), context, resume=True)
    run.folder.write_metadata(plans_with(case), dataset_json=check.data / "dataset.json", settings=settings)
    check.state.update(trained_model=folder, val_ids=list(val_ids))
    return {"rows": _training_rows(check, case, run, settings, time.perf_counter() - started)}


def _training_rows(check: Check, case: PlanCase, run: Any, settings: TrainingSettings,
                   seconds: float) -> list[dict[str, Any]]:
    records = read_metrics(run.folder.fold_dir(0) / "metrics.jsonl")
    last = records[-1]
    rate = settings.iterations_per_epoch / last["epoch_seconds"]
    synthetic = check.state.get("step_rate", {}).get(case.label)
    versus = f"; synthetic-batch step rate {synthetic:.1f} it/s" if synthetic else ""
    dice = {k: v for k, v in last["pseudo_dice"].items() if v is not None}
    mean = sum(dice.values()) / len(dice) if dice else float("nan")
    return [
        row(f"{case.shape}, {len(records)} epochs of {settings.iterations_per_epoch} iterations",
            f"{rate:.2f} it/s", f"last epoch {last['epoch_seconds']:.1f} s including {settings.val_iterations} "
            f"validation batches, first epoch {records[0]['epoch_seconds']:.1f} s, {seconds:.0f} s in all{versus}",
            it_per_s=rate, epochs=len(records), epoch_s=last["epoch_seconds"], total_s=seconds,
            train_loss=last["train_loss"]),
        row(f"{case.shape}, validation pseudo-Dice after {len(records)} epochs", f"{mean:.3f}",
            ", ".join(f"{k} {v:.3f}" for k, v in dice.items()) + f"; EMA {last['ema_dice'] or float('nan'):.3f}",
            mean_pseudo_dice=mean, pseudo_dice=dice, ema_dice=last["ema_dice"]),
    ]
