"""Shared pieces of benchmarks/gpu_check.py: the run's context, result rows, timing, the plans it
measures and the training objects it builds through autoseg's own code.

Nothing here reads or writes image files (no SimpleITK or nibabel): the GPU machine has neither.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.dataset.contract import Dataset, LabelDef
from autoseg.dataset.load import read_dataset_json
from autoseg.fingerprint.contract import CaseFingerprint, Fingerprint, IntensityStats
from autoseg.model_folder import ModelFolder, network_in_channels
from autoseg.planning import plan
from autoseg.planning.contract import Configuration, Plans
from autoseg.runtime.distributed import RuntimeContext
from autoseg.serialization import load_contract
from autoseg.training.augment import deep_supervision_factors, downsample_target
from autoseg.training.loop import FoldRun
from autoseg.training.settings import TrainingSettings
from autoseg.training.setup import TrainingObjects, build_training_objects
from autoseg.training.steps import to_device

GIB = 2.0**30
#: Synthetic CT-like datasets (spacing z, y, x in mm; shape after crop; cases), planned in memory.
SYNTHETIC = {
    "synthetic CT": ((2.5, 0.79, 0.79), (170, 452, 504), 100),  # nnU-Net's abdominal-CT decision
    "large synthetic CT": ((2.5, 0.8, 0.8), (300, 512, 512), 3),  # bench_preprocess.py's large CT
}
#: Edge (voxels) to which --tiny shrinks a patch (never below the network's total stride).
TINY_EDGE, TINY_FEATURES = 16, 8


@dataclass
class Check:
    """One run of the check: where it runs, what it may spend, and what sections hand on to later ones."""

    device: torch.device
    quick: bool
    tiny: bool
    data: Path  # a preprocessed dataset folder: plans.json, dataset.json and the 3d_fullres cache
    work: Path
    deadline: float  # time.perf_counter() value after which sections are skipped
    train_seconds: float
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def remaining(self) -> float:
        """Seconds left before the deadline."""
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


@dataclass(frozen=True)
class PlanCase:
    """One configuration to measure, with the sizes of its network's input and output."""

    label: str
    plans: Plans
    config: Configuration
    in_channels: int
    num_classes: int
    class_names: tuple[str, ...]

    @property
    def shape(self) -> str:
        patch = "x".join(str(p) for p in self.config.patch_size)
        return f"{self.label} {self.config.name} {patch} b{self.config.batch_size}"


def row(what: str, figure: str, detail: str = "", **values: Any) -> dict[str, Any]:
    """One result: a label, the headline figure as text, a detail, and the numbers behind them."""
    return {"what": what, "figure": figure, "detail": detail, **values}


def failure(err: BaseException) -> str:
    """'failed: <type>: <first line>' for a row or a section."""
    text = str(err).strip().splitlines()
    return f"failed: {type(err).__name__}: {text[0][:300] if text else ''}"


def attempt(rows: list[dict[str, Any]], what: str, measure: Callable[..., dict[str, Any]], *args: Any) -> None:
    """Append measure(*args)'s row, or a failed row: one failing item never loses the others."""
    try:
        rows.append(measure(*args))
    except Exception as err:  # every failure is recorded, none aborts the check
        rows.append({"what": what, "error": failure(err), "traceback": traceback.format_exc(limit=4)[-1500:]})
    finally:
        release_memory()


def release_memory() -> None:
    """Drop what a measurement left behind, on the GPU too."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def outside_allocator_bytes(check: Check) -> float:
    """Device memory in use that torch's caching allocator does not hold: the CUDA context, loaded kernels
    and library handles (the GPU machine runs nothing else)."""
    free, total = torch.cuda.mem_get_info(check.device)
    return float(max(0, total - free - torch.cuda.memory_reserved(check.device)))


def per_call(check: Check, call: Callable[[], Any], *, min_calls: int, min_seconds: float
             ) -> tuple[float, int, Any]:
    """(seconds per call, calls, the last call's value): repeat `call` until both minimums are met,
    synchronised on CUDA."""
    check.sync()
    start, calls, value = time.perf_counter(), 0, None
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        value = call()
        calls += 1
    check.sync()
    return (time.perf_counter() - start) / calls, calls, value


# ---------------------------------------------------------------- plans


def data_plan_cases(check: Check, names: tuple[str, ...] = ("3d_fullres",)) -> list[PlanCase]:
    """The prepared dataset's own configurations (e.g. Hippocampus), shrunk with --tiny."""
    plans = load_contract(check.data / "plans.json", Plans, rerun="autoseg plan DATASET")
    dataset = read_dataset_json(check.data / "dataset.json")
    label = dataset.name.split("_", 1)[-1]
    return [_case(label, plans, plans.configurations[name], dataset, tiny=check.tiny)
            for name in names if name in plans.configurations]


def synthetic_plan_cases(label: str, names: tuple[str, ...], *, budget_gb: float = 8.0,
                         tiny: bool = False) -> list[PlanCase]:
    """Configurations planned in memory for one of SYNTHETIC's CT-like datasets (no files needed)."""
    spacing, shape, cases = SYNTHETIC[label]
    stats = IntensityStats(mean=40.0, std=300.0, median=40.0, min=-1000.0, max=2000.0, percentile_00_5=-900.0,
                           percentile_99_5=1500.0)
    fingerprint = Fingerprint(
        dataset_name="Dataset990_SyntheticCT", source_hash="synthetic", channel_names=("CT",),
        cases=tuple(CaseFingerprint(f"case_{i:03d}", spacing, shape, shape, 1.0) for i in range(cases)),
        intensity=(stats,), median_relative_size_after_crop=1.0, samples_per_case=10)
    labels = tuple(LabelDef(name, (value,)) for value, name in enumerate(("background", "organ", "lesion")))
    dataset = Dataset("Dataset990_SyntheticCT", "/nonexistent", ("CT",), labels, ".nii.gz", cases, ())
    plans = plan(fingerprint, dataset, memory_budget_gb=budget_gb)
    suffix = "" if budget_gb == 8.0 else f" ({budget_gb:g} GiB plan)"
    return [_case(label + suffix, plans, plans.configurations[name], dataset, tiny=tiny)
            for name in names if name in plans.configurations]


def _case(label: str, plans: Plans, config: Configuration, dataset: Dataset, *, tiny: bool) -> PlanCase:
    return PlanCase(label=label, plans=plans, config=shrink(config) if tiny else config,
                    in_channels=network_in_channels(plans, config, dataset), num_classes=plans.num_classes,
                    class_names=tuple(item.name for item in dataset.foreground_labels))


def shrink(config: Configuration) -> Configuration:
    """The same topology with at most 8 features per stage, a patch of about 16 voxels per axis (a multiple
    of the total stride) and batch 2: what a CPU runs in milliseconds, for the CI run of the check."""
    topology = config.topology
    features = tuple(min(f, TINY_FEATURES) for f in topology.features_per_stage)
    total = topology.total_stride
    patch = [max(t, math.ceil(min(p, TINY_EDGE) / t) * t) for p, t in zip(config.patch_size, total)]
    if all(p == t for p, t in zip(patch, total)):  # the bottleneck needs 2 voxels for its instance norm
        patch[-1] *= 2
    return dataclasses.replace(config, topology=dataclasses.replace(topology, features_per_stage=features),
                               patch_size=tuple(patch), batch_size=min(config.batch_size, 2))


# ---------------------------------------------------------------- training objects and batches


def fold_run(case: PlanCase, *, folder: Path, cache: Path, train_ids: tuple[str, ...] = (),
             val_ids: tuple[str, ...] = ()) -> FoldRun:
    """autoseg's description of one fold, for a plan case."""
    return FoldRun(folder=ModelFolder(folder), fold=0, config=case.config, cache=cache, train_ids=train_ids,
                   val_ids=val_ids, in_channels=case.in_channels, num_classes=case.num_classes,
                   class_names=case.class_names)


def training_objects(check: Check, case: PlanCase, *, amp: torch.dtype | None, channels_last: bool = False,
                     compile: bool = False) -> TrainingObjects:
    """Network, SGD, grad scaler (active for fp16 only) and deep-supervision loss, as `autoseg train`
    builds them (He init; the output init needs a cache and changes no timing)."""
    settings = TrainingSettings(channels_last=channels_last, compile=compile)
    context = RuntimeContext(device=check.device, amp_dtype=amp)
    run = fold_run(case, folder=check.work / "unused", cache=check.work / "unused")
    return build_training_objects(run, settings, context, initialise=False)


def synthetic_batch(check: Check, case: PlanCase, *, channels_last: bool = False, seed: int = 0
                    ) -> tuple[Any, list[Any]]:
    """A random batch of the plan's batch and patch, with deep-supervision targets, on the device."""
    rng = np.random.default_rng(seed)
    config = case.config
    data = rng.standard_normal((config.batch_size, case.in_channels, *config.patch_size), dtype=np.float32)
    seg = rng.integers(0, case.num_classes, (config.batch_size, 1, *config.patch_size)).astype(np.uint8)
    factors = deep_supervision_factors(config.topology.strides)
    targets = [downsample_target(seg, f) if any(v > 1 for v in f) else seg for f in factors]
    return to_device({"data": data, "target": targets}, check.device, channels_last=channels_last)


def gib(value: float) -> float:
    return round(value / GIB, 3)
