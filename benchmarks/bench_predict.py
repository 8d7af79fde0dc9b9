"""Seconds per case and peak RSS of sliding-window prediction: autoseg against MONAI's
`sliding_window_inference` with the same network, weights, input and settings, in one run.

Usage:
    python benchmarks/bench_predict.py [--quick] [--data FOLDER] [--cases N] [--rounds N] [--model FOLDER]
                                       [--large-shape Z Y X] [--large-width W] [--large-tta]
                                       [--large-control] [--skip-real] [--skip-large] [--no-bf16]
                                       [--threads N] [--markdown FILE]

Two tasks:
  real   the first --cases training cases of Dataset004_Hippocampus (../shared/data; skipped when
         absent), its planned 3d_fullres network at full size (patch 40x56x40, 32-256 features,
         5.6 M parameters) with random weights (seed 0) saved as an autoseg model folder, or the
         trained model folder given with --model. Inputs are preprocessed once, untimed (except for
         the Predictor variant).
  large  a synthetic CT-like volume, already normalised (default 1 x 300 x 512 x 512 float32), and
         an nnU-Net-like CT network: patch 128^3, 6 stages, 3x3x3 convs, 2 per stage, features
         W x (1, 2, 4, 8, 10, 10) (nnU-Net: W = 32; default here W = 8 so that a CPU run stays short),
         3 classes, random weights (seed 0); no TTA unless --large-tta.

Variants, each in a fresh process (so peak RSS does not mix), with and without mirroring TTA:
  autoseg          `autoseg.inference.sliding_window_logits` (float32, one tile per batch, as on CPU)
  MONAI            `monai.inferers.sliding_window_inference(x, patch, 1, net, overlap=0.5,
                   mode="gaussian", sigma_scale=0.125, padding_mode="constant")`; TTA = the same call on
                   each of the 8 flipped inputs, outputs flipped back and averaged (MONAI's
                   TestTimeAugmentation is for random transforms and has no flip-ensemble mode)
  MONAI with autoseg's Gaussian (control)   the same with roi_weight_map = autoseg's importance map
                   (MONAI floors its own Gaussian at 1e-3, autoseg at its smallest value): where both
                   place the tiles alike the outputs must be identical
  + keep freed memory   the process first calls `autoseg.runtime.device.keep_freed_memory()` (glibc
                   keeps freed blocks instead of unmapping them; `autoseg train` does this on CPU,
                   prediction does not); the same setting for MONAI as a fairness control
  + bf16 autocast  autoseg's `amp=torch.bfloat16` on the CPU (not autoseg's default there), together
                   with keep freed memory
  Predictor        (real task only) the whole `Predictor.predict` from the raw image: preprocessing,
                   sliding window and export to the original grid, split into those parts by timing
                   wrappers installed from outside (nothing in autoseg is changed)
The large task leaves out the two MONAI controls unless --large-control (two more MONAI runs).
The real task runs a warm-up case untimed, then --rounds rounds (variant order reversed in every
other round); seconds per case are the median over cases of each case's best round. The large task
runs once per variant after one untimed forward pass. Peak RSS is the process's VmHWM, reset with
/proc/self/clear_refs after the warm-up where the kernel allows it; for the large volume also its
increase over the RSS just before the prediction (input, network and torch already loaded).
"Equal output" is checked on the saved logits: max |difference| and the agreement of the argmax
label maps (share of equal voxels, Dice per foreground class).
MONAI is an optional benchmark dependency (`pip install monai`); without it only autoseg runs.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset004_Hippocampus"
CLASSES_LARGE = 3


@dataclass(frozen=True)
class Variant:
    """One way of predicting: which code runs, with which process-wide settings."""

    label: str
    runner: str  # "autoseg" (sliding_window_logits), "monai" (sliding_window_inference), "predictor"
    keep: bool = False  # glibc keeps freed memory: autoseg.runtime.device.keep_freed_memory(), as `autoseg train`
    bf16: bool = False  # bf16 autocast on the CPU
    same_weights: bool = False  # MONAI gets autoseg's Gaussian as roi_weight_map
    reference: str | None = None  # whose output this variant's output is compared with


VARIANTS = {
    "autoseg": Variant("autoseg", "autoseg", reference="monai"),
    "monai": Variant("MONAI", "monai"),
    "monai_w": Variant("MONAI with autoseg's Gaussian (control)", "monai", same_weights=True, reference="autoseg"),
    "autoseg_keep": Variant("autoseg + keep freed memory", "autoseg", keep=True, reference="autoseg"),
    "monai_keep": Variant("MONAI + keep freed memory", "monai", keep=True, reference="monai"),
    "autoseg_bf16": Variant("autoseg + keep freed memory + bf16 autocast", "autoseg", keep=True, bf16=True,
                            reference="autoseg"),
    "predictor": Variant("autoseg Predictor.predict (whole)", "predictor"),
}


# ---------------------------------------------------------------- measuring inside a child


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _flips(n_axes: int, tta: bool) -> list[tuple[int, ...]]:
    axes = tuple(range(n_axes)) if tta else ()
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def monai_logits(network: Any, data: np.ndarray, patch: tuple[int, ...], tta: bool,
                 same_weights: bool = False, step: float = 0.5) -> np.ndarray:
    """MONAI's sliding window on (c, *spatial); with TTA the mean over all flips, flipped back.
    `same_weights`: pass autoseg's Gaussian as roi_weight_map (MONAI floors its own at 1e-3)."""
    import torch
    from monai.inferers import sliding_window_inference

    from autoseg.inference.tiling import gaussian_importance

    volume = torch.from_numpy(data)[None]
    weights = torch.from_numpy(gaussian_importance(patch)) if same_weights else None
    total = None
    flips = _flips(len(patch), tta)
    with torch.inference_mode():
        for flip in flips:
            dims = [2 + a for a in flip]
            x = torch.flip(volume, dims) if dims else volume
            out = sliding_window_inference(x, patch, 1, network, overlap=1 - step, mode="gaussian", sigma_scale=0.125,
                                           padding_mode="constant", roi_weight_map=weights)
            out = torch.flip(out, dims) if dims else out
            total = out if total is None else total.add_(out)
            del out, x
        assert total is not None
        if len(flips) > 1:
            total /= len(flips)
    return total[0].numpy()


def autoseg_logits(networks: list, data: np.ndarray, patch: tuple[int, ...], tta: bool, num_classes: int,
                   bf16: bool, step: float = 0.5) -> np.ndarray:
    import torch

    from autoseg.inference.sliding import WindowSettings, sliding_window_logits

    settings = WindowSettings(patch=tuple(patch), step=step, mirror_axes=tuple(range(len(patch))) if tta else (),
                              tiles_per_batch=1, gaussian=True)
    return sliding_window_logits(networks, data, settings, num_classes=num_classes, device=torch.device("cpu"),
                                 amp=torch.bfloat16 if bf16 else None).numpy()


def _start_child(spec: dict) -> Variant:
    """Thread count and allocator setting first, before torch allocates anything."""
    import torch

    variant = VARIANTS[spec["tool"]]
    if variant.keep:
        from autoseg.runtime.device import keep_freed_memory

        keep_freed_memory()
    torch.set_num_threads(spec["threads"])
    return variant


def child_real(spec: dict) -> dict:
    """All cases of the real task with one variant; per-case seconds and CPU seconds, peak RSS."""
    import torch

    variant = _start_child(spec)
    from autoseg.inference import PredictOptions, Predictor
    from autoseg.io.readers import read_images

    predictor = Predictor.from_folder(spec["model"], PredictOptions(device="cpu", tta=spec["tta"], amp=False))
    patch = tuple(predictor.config.patch_size)
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    parts: dict[str, float] = {}
    if variant.runner == "predictor":
        import autoseg.inference.predictor as module

        inputs = [read_images([path]) for path in spec["images"]]
        timed_preprocess, timed_window = module.preprocess_arrays, predictor.predict_logits

        def timer(name: str, function: Any) -> Any:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    parts[name] = parts.get(name, 0.0) + time.perf_counter() - start
            return wrapped

        module.preprocess_arrays = timer("preprocess", timed_preprocess)
        predictor.predict_logits = timer("window", timed_window)  # type: ignore[method-assign]

        def run(i: int) -> np.ndarray:
            images, geometry = inputs[i]
            return predictor.predict(images, geometry=geometry).labels
    else:
        with np.load(spec["data"]) as stored:
            inputs = [stored[f"case_{i}"] for i in range(len(spec["images"]))]

        def run(i: int) -> np.ndarray:
            if variant.runner == "monai":
                return monai_logits(predictor.networks[0], inputs[i], patch, spec["tta"], variant.same_weights)
            return autoseg_logits(predictor.networks, inputs[i], patch, spec["tta"], predictor.plans.num_classes,
                                  variant.bf16)
    run(0)  # warm-up, untimed: oneDNN primitives, lazy imports
    parts.clear()
    reset = _reset_peak()
    seconds, cpu, split = [], [], []
    for i in range(len(inputs)):
        start, cpu0 = time.perf_counter(), _cpu_seconds()
        result = run(i)
        seconds.append(time.perf_counter() - start)
        cpu.append(_cpu_seconds() - cpu0)
        split.append(dict(parts))
        parts.clear()
        np.save(out / f"case_{i}.npy", result)
        del result
    return {"seconds": seconds, "cpu": cpu, "parts": split, "peak_mb": _status_kb("VmHWM") / 1024,
            "hwm_reset": reset, "threads": torch.get_num_threads()}


def large_topology(width: int) -> Any:
    from autoseg.model.contract import Topology

    features = tuple(min(width * 2 ** s, 10 * width) for s in range(6))
    return Topology(dim=3, features_per_stage=features, kernel_sizes=((3, 3, 3),) * 6,
                    strides=((1, 1, 1),) + ((2, 2, 2),) * 5, convs_per_stage=(2,) * 6,
                    convs_per_decoder_stage=(2,) * 5, deep_supervision=False)


def child_large(spec: dict) -> dict:
    """One prediction of the large volume with one variant: seconds, CPU seconds, peak RSS and its increase."""
    import torch

    variant = _start_child(spec)
    from autoseg.model.build import build_network

    network = build_network(large_topology(spec["width"]), in_channels=1, num_classes=CLASSES_LARGE)
    network.load_state_dict(torch.load(spec["weights"], weights_only=True))
    network.deep_supervision = False
    network.eval()
    patch = (128, 128, 128)
    data = np.load(spec["data"])
    with torch.inference_mode():
        network(torch.zeros(1, 1, *patch))  # warm-up, untimed
    if variant.runner == "monai":
        import monai.inferers  # noqa: F401  (imported before the clock starts)
    reset = _reset_peak()
    before = _status_kb("VmRSS")
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    if variant.runner == "monai":
        logits = monai_logits(network, data, patch, spec["tta"], variant.same_weights, spec["step"])
    else:
        logits = autoseg_logits([network], data, patch, spec["tta"], CLASSES_LARGE, variant.bf16, spec["step"])
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
    peak = _status_kb("VmHWM")
    np.save(spec["out"], logits)
    return {"seconds": [seconds], "cpu": [cpu], "peak_mb": peak / 1024, "before_mb": before / 1024,
            "hwm_reset": reset, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- preparing the inputs (parent)


def prepare_real(data: Path, folder: Path, n_cases: int, trained: Path | None) -> dict:
    """Plan the dataset and save a model folder with its full-size 3d_fullres network (random weights,
    seed 0), or take the `trained` model folder; save the preprocessed first `n_cases` cases; returns
    the task description."""
    import torch

    from autoseg.dataset.load import load_dataset
    from autoseg.fingerprint import extract_fingerprint
    from autoseg.inference.tiling import padding_for, tile_boxes
    from autoseg.io.readers import read_images
    from autoseg.model.build import build_network, count_parameters
    from autoseg.model_folder import ModelFolder, save_checkpoint
    from autoseg.planning import plan
    from autoseg.preprocessing.case import preprocess_arrays
    from autoseg.training.settings import TrainingSettings

    if trained is None:
        dataset = load_dataset(data)
        plans = plan(extract_fingerprint(dataset, workers=2), dataset)
        model = ModelFolder.for_run(folder / "results", "3d_fullres", plans.plans_name)
        model.write_metadata(plans, dataset_json=data / "dataset.json", settings=TrainingSettings())
    else:
        model = ModelFolder(trained)
        plans = model.load_plans()
    config = plans.configurations["3d_fullres"]
    torch.manual_seed(0)
    network = build_network(config.topology, in_channels=len(plans.channel_names), num_classes=plans.num_classes)
    if trained is None:
        save_checkpoint(model.checkpoint(0, "final"), {"network": network.state_dict(), "epoch": 1,
                                                       "mirror_axes": list(range(config.dim))})
    images = sorted((data / "imagesTr").glob("*_0000.nii.gz"))[:n_cases]
    arrays, tiles, shapes = {}, [], []
    for i, path in enumerate(images):
        image, geometry = read_images([path])
        prepared = preprocess_arrays(image, None, geometry, plans=plans, config=config)
        arrays[f"case_{i}"] = prepared.data
        shape = prepared.data.shape[1:]
        padded = [s + sum(p) for s, p in zip(shape, padding_for(shape, config.patch_size))]
        tiles.append(len(tile_boxes(padded, config.patch_size, 0.5)))
        shapes.append(shape)
    np.savez(folder / "real.npz", **arrays)
    return {"model": str(model.root), "data": str(folder / "real.npz"), "images": [str(p) for p in images],
            "patch": list(config.patch_size), "params": count_parameters(network), "tiles": tiles,
            "shapes": shapes, "classes": plans.num_classes,
            "weights": "random (seed 0)" if trained is None else f"trained ({trained})"}


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A normalised CT-like volume (1, z, y, x) float32: air, an elliptic body, three ellipsoid
    organs of different intensity and a bright vessel, with Gaussian noise."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z, y, x = (np.arange(n, dtype=np.float32) / n for n in shape)
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    volume = np.full(shape, -2.0, dtype=np.float32)
    body = ((y - 0.5) / 0.42) ** 2 + ((x - 0.5) / 0.47) ** 2 < 1
    volume[np.broadcast_to(body, shape)] = 0.0
    for (cz, cy, cx), (rz, ry, rx), value in (((0.5, 0.45, 0.35), (0.3, 0.18, 0.2), 0.8),
                                              ((0.45, 0.55, 0.65), (0.2, 0.08, 0.08), 0.4),
                                              ((0.6, 0.35, 0.6), (0.15, 0.07, 0.07), 1.2)):
        volume[((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1] = value
    vy, vx = int(0.6 * ny), int(0.45 * nx)
    volume[:, vy:vy + 3, vx:vx + 3] = 2.5
    for start in range(0, nz, 16):  # noise in slabs: no second full-size float64 array
        slab = volume[start:start + 16]
        slab += rng.normal(0.0, 0.2, slab.shape).astype(np.float32)
    return volume[None]


def prepare_large(folder: Path, shape: tuple[int, int, int], width: int, step: float) -> dict:
    import torch

    from autoseg.inference.tiling import tile_boxes
    from autoseg.model.build import build_network, count_parameters

    np.save(folder / "large.npy", synthetic_ct(shape))
    torch.manual_seed(0)
    network = build_network(large_topology(width), in_channels=1, num_classes=CLASSES_LARGE)
    torch.save(network.state_dict(), folder / "large_weights.pt")
    return {"data": str(folder / "large.npy"), "weights": str(folder / "large_weights.pt"), "width": width,
            "shape": list(shape), "params": count_parameters(network),
            "tiles": len(tile_boxes(shape, (128, 128, 128), step)), "step": step,
            "features": list(large_topology(width).features_per_stage)}


# ---------------------------------------------------------------- running and comparing (parent)


def measure(task: str, spec: dict) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps({"task": task, **spec})]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{task} {spec['tool']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def agreement(a: np.ndarray, b: np.ndarray, classes: int) -> dict:
    """Max |a - b| of logits (c, ...) and counts for argmax agreement and per-class Dice."""
    la, lb = a.argmax(axis=0), b.argmax(axis=0)
    counts = {"max_diff": float(np.abs(a - b).max()), "max_abs": float(np.abs(b).max()),
              "equal": int(np.count_nonzero(la == lb)), "voxels": int(la.size)}
    for c in range(1, classes):
        pa, pb = la == c, lb == c
        counts[f"inter_{c}"] = int(np.count_nonzero(pa & pb))
        counts[f"sum_{c}"] = int(np.count_nonzero(pa) + np.count_nonzero(pb))
    return counts


def merge(stats: list[dict], classes: int) -> dict:
    total = {"max_diff": max(s["max_diff"] for s in stats), "max_abs": max(s["max_abs"] for s in stats)}
    total["agree"] = sum(s["equal"] for s in stats) / sum(s["voxels"] for s in stats)
    total["dice"] = []
    for c in range(1, classes):
        both = sum(s[f"sum_{c}"] for s in stats)
        total["dice"].append(2 * sum(s[f"inter_{c}"] for s in stats) / both if both else 1.0)
    return total


def compare_real(folder: Path, ours: str, theirs: str, n: int, classes: int) -> dict:
    stats = [agreement(np.load(folder / ours / f"case_{i}.npy"), np.load(folder / theirs / f"case_{i}.npy"), classes)
             for i in range(n)]
    return merge(stats, classes)


def compare_large(ours: Path, theirs: Path, classes: int) -> dict:
    a, b = np.load(ours, mmap_mode="r"), np.load(theirs, mmap_mode="r")
    stats = [agreement(np.asarray(a[:, z:z + 16]), np.asarray(b[:, z:z + 16]), classes)
             for z in range(0, a.shape[1], 16)]
    return merge(stats, classes)


def run_real(args: argparse.Namespace, folder: Path, variants: list[tuple[str, bool]]) -> tuple[dict, dict]:
    task = prepare_real(args.data, folder, args.cases, args.model)
    print(f"real: {len(task['images'])} Hippocampus cases, patch {task['patch']}, {task['params']:,} parameters, "
          f"tiles per case {min(task['tiles'])}-{max(task['tiles'])} (mean {statistics.mean(task['tiles']):.2f})",
          flush=True)
    results: dict[tuple[str, bool], list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for tool, tta in (variants if r % 2 == 0 else variants[::-1]):
            spec = {**task, "tool": tool, "tta": tta, "threads": args.threads,
                    "out": str(folder / f"real_{tool}_{int(tta)}")}
            results[(tool, tta)].append(measure("real", spec))
            row = results[(tool, tta)][-1]
            print(f"  round {r + 1} {tool:13s} tta={int(tta)}: median {statistics.median(row['seconds']):.3f} s "
                  f"per case, peak {row['peak_mb']:.0f} MB", flush=True)
    rows = {}
    for (tool, tta), runs in results.items():
        best = [min(run["seconds"][i] for run in runs) for i in range(len(task["images"]))]
        cpu = [min(run["cpu"][i] for run in runs) for i in range(len(task["images"]))]
        parts = {}
        if tool == "predictor":
            for name in ("preprocess", "window"):
                parts[name] = statistics.median(min(run["parts"][i].get(name, 0.0) for run in runs)
                                                for i in range(len(best)))
        use = sum(cpu) / sum(best) / runs[0]["threads"]
        rows[(tool, tta)] = {"seconds": statistics.median(best), "cpu": statistics.median(cpu), "use": use,
                             "peak_mb": max(run["peak_mb"] for run in runs), "parts": parts,
                             "threads": runs[0]["threads"]}
        reference = VARIANTS[tool].reference
        if reference and (reference, tta) in results:
            rows[(tool, tta)]["compared"] = compare_real(folder, f"real_{tool}_{int(tta)}",
                                                         f"real_{reference}_{int(tta)}", len(best), task["classes"])
    return task, rows


def run_large(args: argparse.Namespace, folder: Path, variants: list[tuple[str, bool]]) -> tuple[dict, dict]:
    task = prepare_large(folder, tuple(args.large_shape), args.large_width, args.large_step)
    print(f"large: volume {task['shape']}, patch 128^3, features {task['features']}, {task['params']:,} parameters, "
          f"{task['tiles']} tiles", flush=True)
    rows = {}
    for tool, tta in variants:
        out = folder / f"large_{tool}_{int(tta)}.npy"
        spec = {**task, "tool": tool, "tta": tta, "threads": args.threads, "out": str(out)}
        row = measure("large", spec)
        rows[(tool, tta)] = {"seconds": row["seconds"][0], "cpu": row["cpu"][0], "peak_mb": row["peak_mb"],
                             "use": row["cpu"][0] / row["seconds"][0] / row["threads"],
                             "increase_mb": row["peak_mb"] - row["before_mb"], "threads": row["threads"]}
        print(f"  {tool:13s} tta={int(tta)}: {row['seconds'][0]:.1f} s, peak {row['peak_mb']:.0f} MB "
              f"(+{row['peak_mb'] - row['before_mb']:.0f} MB)", flush=True)
    for (tool, tta), row in rows.items():
        reference = VARIANTS[tool].reference
        if reference and (reference, tta) in rows:
            row["compared"] = compare_large(folder / f"large_{tool}_{int(tta)}.npy",
                                            folder / f"large_{reference}_{int(tta)}.npy", CLASSES_LARGE)
    for (tool, tta) in rows:
        (folder / f"large_{tool}_{int(tta)}.npy").unlink(missing_ok=True)
    return task, rows


# ---------------------------------------------------------------- report


def _equal_cells(tool: str, row: dict) -> str:
    if "compared" not in row:
        return "| - | - | - | - |"
    v = row["compared"]
    dice = " / ".join(f"{d:.4f}" for d in v["dice"])
    return (f"| {VARIANTS[VARIANTS[tool].reference].label} | {v['max_diff']:.2e} (max abs logit {v['max_abs']:.1f}) | "
            f"{100 * v['agree']:.3f} % | {dice} |")


def _ordered(rows: dict) -> list:
    return sorted(rows.items(), key=lambda kv: (kv[0][1], list(VARIANTS).index(kv[0][0])))


def _timing_cells(rows: dict, tool: str, tta: bool, digits: int) -> str:
    row, monai_row = rows[(tool, tta)], rows.get(("monai", tta))
    ratio = f"**{monai_row['seconds'] / row['seconds']:.2f}x**" if monai_row else "-"
    return (f"{'8 flips' if tta else 'off'} | {row['seconds']:.{digits}f} | {ratio} | "
            f"{row['cpu']:.{digits}f} ({100 * row['use']:.0f} %)")


def render(args: argparse.Namespace, real: tuple[dict, dict] | None, large: tuple[dict, dict] | None) -> str:
    import torch

    try:
        import monai

        monai_version = monai.__version__
    except ImportError:
        monai_version = "not installed"
    lines = [f"Measured {datetime.date.today().isoformat()} on {platform.machine()} Linux, {os.cpu_count()} cores, "
             f"Python {platform.python_version()}, torch {torch.__version__}, MONAI {monai_version}, "
             f"{args.threads} torch threads. CPU s (use): CPU seconds and CPU time / (wall time x threads), well "
             "below 100 % when another process took CPU time.", ""]
    equal_head = "output compared with | max abs logit diff | argmax agreement | Dice of the argmaxes (classes 1 / 2) |"
    if real:
        task, rows = real
        tiles = task["tiles"]
        lines += [f"### Real: Dataset004_Hippocampus, {len(task['images'])} cases, 3d_fullres patch "
                  f"{'x'.join(map(str, task['patch']))}, {task['params']:,} parameters, {task['weights']} weights",
                  "", f"Tiles per case: {min(tiles)}-{max(tiles)} (mean {statistics.mean(tiles):.2f}). Seconds: median "
                  f"over the cases of each case's best of {args.rounds} round(s).", "",
                  f"| variant | TTA | s per case | MONAI s / this s | CPU s (use) | peak RSS MB | {equal_head}",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for (tool, tta), row in _ordered(rows):
            name = VARIANTS[tool].label
            if row["parts"]:
                rest = row["seconds"] - row["parts"]["preprocess"] - row["parts"]["window"]
                name += (f": preprocess {row['parts']['preprocess']:.3f} + window {row['parts']['window']:.3f} + "
                         f"export {rest:.3f} s")
            lines.append(f"| {name} | {_timing_cells(rows, tool, tta, 3)} | {row['peak_mb']:.0f} "
                         f"{_equal_cells(tool, row)}")
        lines.append("")
    if large:
        task, rows = large
        prob_mb = CLASSES_LARGE * int(np.prod(task["shape"])) * 4 / 2**20
        lines += [f"### Large synthetic CT: 1 x {' x '.join(map(str, task['shape']))} float32, patch 128^3, "
                  f"features {task['features']}, {task['params']:,} parameters, step {task['step']} of the patch "
                  f"({task['tiles']} tiles)", "",
                  f"float32 probability map ({CLASSES_LARGE} classes): {prob_mb:.0f} MB. Peak RSS: the whole process "
                  "during prediction (input, network and torch included); increase: over the RSS before it.", "",
                  "| variant | TTA | s | MONAI s / this s | CPU s (use) | peak RSS MB (/ prob. map) | "
                  f"peak increase MB (/ prob. map) | {equal_head}",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for (tool, tta), row in _ordered(rows):
            lines.append(f"| {VARIANTS[tool].label} | {_timing_cells(rows, tool, tta, 1)} | "
                         f"{row['peak_mb']:.0f} ({row['peak_mb'] / prob_mb:.2f}x) | {row['increase_mb']:.0f} "
                         f"({row['increase_mb'] / prob_mb:.2f}x) {_equal_cells(tool, row)}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 cases, 1 round, large volume 128 x 256 x 256: a smoke test of a few minutes")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cases", type=int, default=None, help="real cases (default 10, quick 3)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds over the real variants (default 2, quick 1)")
    parser.add_argument("--large-shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="default 300 512 512 (quick 128 256 256)")
    parser.add_argument("--large-width", type=int, default=8, help="features of stage 0 (nnU-Net: 32)")
    parser.add_argument("--large-tta", action="store_true", help="also run the large volume with 8 flips (8x longer)")
    parser.add_argument("--large-control", action="store_true",
                        help="also run the two MONAI controls on the large volume (two more MONAI runs)")
    parser.add_argument("--large-step", type=float, default=0.5,
                        help="tile step of the large task as a share of the patch (0.5 = nnU-Net's overlap; 1.0: no "
                             "overlap, 4x fewer tiles, for memory runs with a full-width network: the peak does not "
                             "depend on the step)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help="run only these variants (default: all that apply)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a trained autoseg 3d_fullres model folder of the real dataset (default: random weights)")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--no-bf16", action="store_true", help="leave out the autoseg bf16-autocast variant")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every variant (default: torch's)")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child_real(spec) if spec["task"] == "real" else child_large(spec)))
        return
    import torch

    args.cases = args.cases or (3 if args.quick else 10)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.large_shape = args.large_shape or ([128, 256, 256] if args.quick else [300, 512, 512])
    args.threads = args.threads or torch.get_num_threads()
    try:
        import monai  # noqa: F401

        have_monai = True
    except ImportError:
        have_monai = False
        print("monai is not installed: only autoseg runs (pip install monai for the comparison)")
    skip = set() if have_monai else {"monai", "monai_w", "monai_keep"}
    skip |= {"autoseg_bf16"} if args.no_bf16 else set()
    skip |= set(VARIANTS) - set(args.variants or VARIANTS)
    real_tools = [name for name in VARIANTS if name not in skip]
    large_tools = [name for name in real_tools if name != "predictor"
                   and (args.large_control or name not in ("monai_w", "monai_keep"))]
    real = large = None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        folder = Path(tmp)
        if args.skip_real:
            pass
        elif not (args.data / "dataset.json").is_file():
            print(f"real data not found at {args.data}: the real task is skipped")
        else:
            variants = [(tool, tta) for tta in (False, True) for tool in real_tools]
            real = run_real(args, folder, variants)
        if not args.skip_large:
            variants = [(tool, tta) for tta in ((False, True) if args.large_tta else (False,)) for tool in large_tools]
            large = run_large(args, folder, variants)
    table = render(args, real, large)
    print(f"\n(total {time.perf_counter() - start:.0f} s)\n")
    print(table)
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
