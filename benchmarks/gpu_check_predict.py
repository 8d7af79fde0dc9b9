"""The prediction section of benchmarks/gpu_check.py: sliding-window prediction with the accumulator on
the GPU and forced into CPU memory (equal outputs, seconds per case, TTA on and off), the argmax
agreement of the device's mixed precision with CPU fp32, and a large CT-sized volume."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gpu_check_common import Check, PlanCase, attempt, data_plan_cases, row, synthetic_plan_cases
from gpu_check_run import cached_case_ids, plans_with

import autoseg.inference.sliding as sliding
from autoseg.evaluation.metrics import Counts, confusion_counts, dice_score
from autoseg.inference.predictor import PredictOptions, Predictor
from autoseg.inference.sliding import WindowSettings, sliding_window_logits
from autoseg.model.build import build_network
from autoseg.model_folder import ModelFolder, save_checkpoint
from autoseg.preprocessing.cache import read_case
from autoseg.runtime.device import amp_dtype, autocast
from autoseg.training.settings import TrainingSettings

#: Cases predicted: quick, full.
CASES = {True: 3, False: 10}
#: The large volume (z, y, x) of the full and the quick run on a GPU.
LARGE_VOLUME = {True: (150, 256, 256), False: (300, 512, 512)}


@contextmanager
def cpu_accumulator() -> Iterator[None]:
    """Make sliding_window_logits keep its logit sum in CPU memory, as it does when the GPU is full."""
    original = sliding._accumulator

    def on_cpu(num_classes: int, shape: Any, device: torch.device, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
        return original(num_classes, shape, torch.device("cpu"), dtype)

    sliding._accumulator = on_cpu
    try:
        yield
    finally:
        sliding._accumulator = original


def prediction(check: Check) -> dict[str, Any]:
    """Rows for the trained model of the training section (random weights when it did not run)."""
    case = data_plan_cases(check)[0]
    trained = check.state.get("trained_model")
    folder = trained or _random_model(check, case)
    cache = check.data / case.config.data_id
    ids = (check.state.get("val_ids") or cached_case_ids(cache))[: 1 if not check.cuda else CASES[check.quick]]
    cases = [_case_arrays(cache, i, case.config.patch_size if check.tiny else None) for i in ids]
    weights = "trained" if trained else "random"
    rows: list[dict[str, Any]] = []
    for tta in (False, True):
        attempt(rows, f"{case.shape}, TTA {tta}", _accumulator_row, check, case, folder, cases, tta, weights)
    attempt(rows, f"{case.shape}, mixed precision vs CPU fp32", _agreement_row, check, case, folder, cases, weights)
    attempt(rows, "large volume", _large_volume_row, check)
    return {"rows": rows, "cases": list(ids), "weights": weights}


def _case_arrays(cache: Path, case_id: str, crop: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """A cached case's data (c, z, y, x) and labels (z, y, x), cut to one patch for --tiny."""
    data, seg, _, _ = read_case(cache, case_id)
    box = tuple(slice(0, p) for p in crop) if crop else ()
    return np.array(data[(slice(None), *box)]), np.array(seg[box])


def _random_model(check: Check, case: PlanCase) -> Path:
    """A model folder with the plan's network at random weights (fold 0, final checkpoint)."""
    folder = ModelFolder.for_run(check.work / "random_model", case.config.name, case.plans.plans_name)
    network = build_network(case.config.topology, in_channels=case.in_channels, num_classes=case.num_classes)
    folder.write_metadata(plans_with(case), dataset_json=check.data / "dataset.json", settings=TrainingSettings())
    save_checkpoint(folder.checkpoint(0, "final"), {"network": network.state_dict(),
                                                   "mirror_axes": list(range(case.config.dim))})
    return folder.root


def _predict_all(check: Check, predictor: Predictor, cases: list[tuple[np.ndarray, np.ndarray]]
                 ) -> tuple[list[np.ndarray], float]:
    """Logits per case and seconds per case (after one untimed warm-up case)."""
    predictor.predict_logits(cases[0][0])
    check.sync()
    started = time.perf_counter()
    logits = [predictor.predict_logits(data) for data, _ in cases]
    check.sync()
    return logits, (time.perf_counter() - started) / len(cases)


def _options(check: Check, *, tta: bool, device: str | None = None, amp: bool = True) -> PredictOptions:
    on_cpu = (device or check.device.type) == "cpu"
    return PredictOptions(folds=("0",), device=device or str(check.device), tta=tta, amp=amp,
                          cpu_bf16=on_cpu and amp and not check.cuda)


def _accumulator_row(check: Check, case: PlanCase, folder: Path, cases: list[tuple[np.ndarray, np.ndarray]],
                     tta: bool, weights: str) -> dict[str, Any]:
    predictor = Predictor.from_folder(folder, _options(check, tta=tta))
    on_device, device_s = _predict_all(check, predictor, cases)
    with cpu_accumulator():
        on_cpu, cpu_s = _predict_all(check, predictor, cases)
    difference = max(float(np.abs(a - b).max()) for a, b in zip(on_device, on_cpu))
    dice = _dice([(logits.argmax(0), seg) for logits, (_, seg) in zip(on_device, cases)], predictor.plans.num_classes)
    known = dice[np.isfinite(dice)]  # a class in neither prediction nor labels has no Dice
    mean = float(known.mean()) if known.size else float("nan")
    mirrors = len(predictor.window.mirror_axes)
    return row(f"{case.shape}, {len(cases)} cases, TTA {'on' if tta else 'off'} ({2 ** mirrors} passes), "
               f"{weights} weights",
               f"{device_s:.3f} s/case ({check.device.type} sum) vs {cpu_s:.3f} (CPU sum)",
               f"max |logit difference| {difference:.2e}; Dice vs the cached labels {mean:.3f} "
               f"({', '.join(f'{d:.3f}' for d in dice)})", device_accumulator_s=device_s, cpu_accumulator_s=cpu_s,
               max_abs_difference=difference, dice=[float(d) for d in dice], mean_dice=mean, tta=tta)


def _dice(pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> np.ndarray:
    """Dice per foreground class pooled over all cases (label -1, outside the body, counts as background)."""
    scores = []
    for c in range(1, num_classes):
        counts = [confusion_counts(predicted == c, truth == c) for predicted, truth in pairs]
        scores.append(dice_score(Counts(*(sum(column) for column in zip(*counts, strict=True)))))
    return np.array(scores)


def _agreement_row(check: Check, case: PlanCase, folder: Path, cases: list[tuple[np.ndarray, np.ndarray]],
                   weights: str) -> dict[str, Any]:
    mixed = Predictor.from_folder(folder, _options(check, tta=False))
    reference = Predictor.from_folder(folder, _options(check, tta=False, device="cpu", amp=False))
    labels_mixed = [logits.argmax(0) for logits in _predict_all(check, mixed, cases)[0]]
    labels_fp32, cpu_s = _predict_all(check, reference, cases)
    labels_fp32 = [logits.argmax(0) for logits in labels_fp32]
    agree = sum(int(np.sum(a == b)) for a, b in zip(labels_mixed, labels_fp32)) / sum(a.size for a in labels_fp32)
    dice = _dice(list(zip(labels_mixed, labels_fp32)), mixed.plans.num_classes)
    precision = str(mixed.amp).replace("torch.", "") if mixed.amp else "fp32"
    return row(f"{case.shape}, {len(cases)} cases, {weights} weights, {check.device.type} {precision} vs CPU fp32 "
               "(TTA off)",
               f"{100 * agree:.3f} % equal voxels", f"Dice between the two per class "
               f"{', '.join(f'{d:.4f}' for d in dice)}; CPU fp32 {cpu_s:.2f} s/case", agreement=agree,
               dice_between=[float(d) for d in dice], cpu_fp32_s=cpu_s)


def _large_volume_row(check: Check) -> dict[str, Any]:
    """sliding_window_logits over a CT-sized random volume with the large CT plan's network (random
    weights, no TTA): GPU accumulator vs forced CPU accumulator."""
    case = synthetic_plan_cases("large synthetic CT", ("3d_fullres",), tiny=check.tiny)[0]
    network = build_network(case.config.topology, in_channels=case.in_channels, num_classes=case.num_classes)
    network.deep_supervision = False
    network = network.to(check.device).eval()
    patch = case.config.patch_size
    shape = tuple(p + p // 2 for p in patch) if check.tiny else LARGE_VOLUME[check.quick]
    volume = np.random.default_rng(0).standard_normal((case.in_channels, *shape), dtype=np.float32)
    window = WindowSettings(patch=case.config.patch_size, tiles_per_batch=case.config.batch_size)
    with torch.inference_mode(), autocast(check.device, amp_dtype(check.device)):  # cuDNN's first calls
        network(torch.zeros(case.config.batch_size, case.in_channels, *case.config.patch_size, device=check.device))

    def predict() -> tuple[torch.Tensor, float]:
        check.sync()
        started = time.perf_counter()
        out = sliding_window_logits([network], volume, window, num_classes=case.num_classes, device=check.device,
                                    amp=amp_dtype(check.device))
        check.sync()
        return out, time.perf_counter() - started

    on_device, device_s = predict()
    with cpu_accumulator():
        on_cpu, cpu_s = predict()
    difference = float((on_device - on_cpu).abs().max())
    size = "x".join(str(s) for s in shape)
    return row(f"large volume {size}, {case.shape}, no TTA",
               f"{device_s:.2f} s ({check.device.type} sum) vs {cpu_s:.2f} s (CPU sum)",
               f"max |logit difference| {difference:.2e}; random weights", device_accumulator_s=device_s,
               cpu_accumulator_s=cpu_s, max_abs_difference=difference, volume=list(shape))
