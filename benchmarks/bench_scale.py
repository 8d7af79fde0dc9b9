"""Issue 18: file -> file prediction of a large CT with many classes: peak memory and time per voxel.

A synthetic CT (int16, HU-like: air, a body cylinder of soft tissue, a spine of bone) of --shape voxels
(z y x) at --spacing mm is written once as .mha; a model folder with random weights is planned by
autoseg's planner for a dataset of such scans with --classes classes (background included), its
networks narrowed by --width-divisor (quarter width: 4), and `autoseg predict` segments the file in a fresh
process (no TTA, CPU, --threads; --flags adds `autoseg predict` options, default `--precision fp32`; e.g.
`--flags "--engine openvino --precision fp32"` for the engine path's memory against torch's, issue 16: then a
first run fills the engine cache, reported apart, and the second is timed). Reported per run: wall seconds
of the command (process start, model load, reading, preprocessing, sliding window, export, writing),
microseconds per voxel, peak RSS of the process (GiB) and how many voxels got each label.

`parts` predicts a folder of --cases such volumes once with one process (--threads threads) and once
with --parts processes started together, `--part i/N` each, --threads / N threads each (at least 1),
and reports both wall times (issue 18: N processes on one machine against one).

--source DIR runs the predictor of another checkout (e.g. a git worktree of the commit before the
streamed export) on the same files, for "time per voxel within 10 % of today's predictor". Each run
appends one JSON line to --out (a rerun skips what is there); `table` prints the Markdown table.

    python benchmarks/bench_scale.py run --shape 1000 512 512 --classes 105 --width-divisor 4
    python benchmarks/bench_scale.py run --shape 200 512 512 --classes 3 --source /tmp/old-src
    python benchmarks/bench_scale.py parts --shape 64 256 256 --classes 3 --cases 8 --parts 4
    python benchmarks/bench_scale.py table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_families import autoseg, cpu_name
from bench_learning import done_runs

#: `autoseg predict` options of a run unless --flags says otherwise (explicit fp32: `auto` is bf16 on
#: native-bf16 CPUs, and the issue 18 figures are fp32).
DEFAULT_FLAGS = "--precision fp32"


def write_volume(path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    """A CT-like int16 volume (z, y, x): air -1000, a body cylinder at 40 HU with noise, bone at 700."""
    import numpy as np

    from autoseg.io.geometry import Geometry
    from autoseg.io.readers import write_image

    z, y, x = shape
    rng = np.random.default_rng(0)
    yy, xx = np.ogrid[:y, :x]
    body = ((yy - y / 2) / (0.42 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 <= 1
    spine = ((yy - 0.7 * y) / (0.06 * y)) ** 2 + ((xx - x / 2) / (0.06 * x)) ** 2 <= 1
    plane = np.where(body, 40, -1000).astype(np.int16)
    plane[spine] = 700
    volume = np.empty(shape, dtype=np.int16)
    for k in range(z):
        volume[k] = plane + rng.integers(-20, 21, size=(y, x), dtype=np.int16) * body
    geometry = Geometry(shape=shape, file_spacing=tuple(reversed(spacing)), origin=(0.0, 0.0, 0.0),
                        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    write_image(volume, geometry, path)


def make_model(folder: Path, shape: tuple[int, ...], spacing: tuple[float, ...], classes: int, divisor: int) -> Path:
    """A 3d_fullres model folder planned for scans like the volume, random weights (seed 0)."""
    import torch

    from autoseg.dataset.contract import Dataset, LabelDef
    from autoseg.fingerprint.contract import CaseFingerprint, Fingerprint, IntensityStats
    from autoseg.model.build import build_network
    from autoseg.model_folder import ModelFolder, save_checkpoint
    from autoseg.planning import plan
    from autoseg.training.settings import TrainingSettings

    stats = IntensityStats(mean=40.0, std=60.0, median=40.0, min=-1000.0, max=700.0, percentile_00_5=-100.0,
                           percentile_99_5=600.0)
    cases = tuple(CaseFingerprint(f"ct_{i:03d}", tuple(spacing), tuple(shape), tuple(shape), 1.0) for i in range(50))
    fingerprint = Fingerprint("Dataset990_ScaleCT", "synthetic", ("CT",), cases, (stats,), 1.0, 10)
    labels = (LabelDef("background", (0,)),) + tuple(LabelDef(f"structure_{i}", (i,)) for i in range(1, classes))
    dataset = Dataset("Dataset990_ScaleCT", str(folder), ("CT",), labels, ".nii.gz", 50, ())
    plans = plan(fingerprint, dataset)
    config = plans.configurations["3d_fullres"]
    features = tuple(max(f // divisor, 4) for f in config.topology.features_per_stage)
    config = dataclasses.replace(config, topology=dataclasses.replace(config.topology, features_per_stage=features))
    plans = dataclasses.replace(plans, configurations={"3d_fullres": config})
    model = ModelFolder.for_run(folder, "3d_fullres", plans.plans_name)
    dataset_json = folder / "dataset.json"
    dataset_json.parent.mkdir(parents=True, exist_ok=True)
    dataset_json.write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {d.name: d.values[0] for d in labels},
                                        "numTraining": 50, "file_ending": ".nii.gz"}))
    model.write_metadata(plans, dataset_json=dataset_json, settings=TrainingSettings())
    torch.manual_seed(0)
    network = build_network(config.topology, in_channels=1, num_classes=classes)
    save_checkpoint(model.checkpoint(0, "final"), {"network": network.state_dict(), "epoch": 1,
                                                    "mirror_axes": [0, 1, 2]})
    return model.root


def predict(model: Path, inputs: Path, output: Path, source: Path | None, threads: int,
            flags: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of `autoseg predict` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if source is not None:
        env["PYTHONPATH"] = str(source)
    seconds, rss = autoseg("predict", "-i", str(inputs), "-o", str(output), "-m", str(model), "--no-tta", "--device",
                           "cpu", "--overwrite", *flags.split(), env=env, measure_rss=True)
    assert rss is not None
    return seconds, rss


def run(args: argparse.Namespace) -> None:
    import numpy as np

    from autoseg.io.readers import read_label

    shape, spacing = tuple(args.shape), tuple(args.spacing)
    tag = f"{'x'.join(map(str, shape))}"
    key = {"shape": list(shape), "spacing": list(spacing), "classes": args.classes, "width_divisor": args.width_divisor,
           "source": str(args.source) if args.source else "this checkout", "threads": args.threads}
    if args.flags != DEFAULT_FLAGS:
        key["flags"] = args.flags
    if any(all(run.get(k) == v for k, v in key.items()) for run in done_runs(args.out)):
        print("already measured:", key)
        return
    inputs = args.work / f"in_{tag}"
    if not (inputs / "ct_0000.mha").is_file():
        inputs.mkdir(parents=True, exist_ok=True)
        write_volume(inputs / "ct_0000.mha", shape, spacing)
    model = make_model(args.work / f"model_{tag}_{args.classes}_{args.width_divisor}", shape, spacing, args.classes,
                       args.width_divisor)
    output = args.work / f"out_{tag}_{args.classes}"
    first_run = {}
    if "--engine" in args.flags:  # fills the engine cache (export, compile, verification): reported apart
        first_seconds, first_rss = predict(model, inputs, output, args.source, args.threads, args.flags)
        first_run = {"first_run_seconds": round(first_seconds, 1), "first_run_peak_rss_gb": round(first_rss, 2)}
    seconds, rss = predict(model, inputs, output, args.source, args.threads, args.flags)
    labels, _ = read_label(output / "ct.mha")
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=args.classes)
    result = {**key, **first_run, "seconds": round(seconds, 1),
              "us_per_voxel": round(seconds / np.prod(shape) * 1e6, 4),
              "peak_rss_gb": round(rss, 2), "labels_present": int((counts > 0).sum()),
              "labels_sha": hash_labels(labels), "cpu": cpu_name()}
    print(json.dumps(result), flush=True)
    with args.out.open("a") as handle:
        handle.write(json.dumps(result) + "\n")


def run_parts(args: argparse.Namespace) -> None:
    """One process against --parts processes on the same folder of --cases volumes."""
    shape, spacing = tuple(args.shape), tuple(args.spacing)
    tag = f"{'x'.join(map(str, shape))}_{args.cases}"
    key = {"task": "parts", "shape": list(shape), "classes": args.classes, "cases": args.cases, "parts": args.parts,
           "threads": args.threads}
    if any(all(run.get(k) == v for k, v in key.items()) for run in done_runs(args.out)):
        print("already measured:", key)
        return
    inputs = args.work / f"in_{tag}"
    inputs.mkdir(parents=True, exist_ok=True)
    for index in range(args.cases):
        if not (inputs / f"ct{index:03d}_0000.mha").is_file():
            write_volume(inputs / f"ct{index:03d}_0000.mha", shape, spacing)
    model = make_model(args.work / f"model_{tag}_{args.classes}", shape, spacing, args.classes, args.width_divisor)
    base = [sys.executable, "-m", "autoseg", "predict", "-i", str(inputs), "-m", str(model), "--no-tta", "--device",
            "cpu", "--overwrite"]
    started = time.perf_counter()
    subprocess.run([*base, "-o", str(args.work / f"out_{tag}_one")], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    one = time.perf_counter() - started
    threads = str(max(1, args.threads // args.parts))
    started = time.perf_counter()
    processes = [subprocess.Popen([*base, "-o", str(args.work / f"out_{tag}_parts"), "--part", f"{i}/{args.parts}"],
                                  env={**os.environ, "OMP_NUM_THREADS": threads}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for i in range(1, args.parts + 1)]
    if any(process.wait() for process in processes):
        raise SystemExit("a part failed")
    split = time.perf_counter() - started
    written = sorted(p.name for p in (args.work / f"out_{tag}_parts").glob("*.mha"))
    result = {**key, "one_process_seconds": round(one, 1), "parts_seconds": round(split, 1),
              "speedup": round(one / split, 2), "written": len(written), "cpu": cpu_name()}
    print(json.dumps(result), flush=True)
    with args.out.open("a") as handle:
        handle.write(json.dumps(result) + "\n")


def hash_labels(labels) -> str:
    import hashlib

    return hashlib.sha256(labels.tobytes()).hexdigest()[:12]


def table(runs: list[dict]) -> str:
    lines = ["| volume (z y x) | classes | width | predictor | seconds | us / voxel | peak RSS GiB | labels (sha) |",
             "|---|---|---|---|---|---|---|---|"]
    parts = [r for r in runs if r.get("task") == "parts"]
    runs = [r for r in runs if r.get("task") != "parts"]
    for r in runs:
        predictor = f"{r['source']} {r.get('flags', '')}".strip()
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['classes']} | 1/{r['width_divisor']} | {predictor} | "
                     f"{r['seconds']:.1f} | {r['us_per_voxel']:.3f} | {r['peak_rss_gb']:.2f} | {r['labels_sha']} |")
    if parts:
        lines += ["", "| folder | processes | one process s | N processes s | speed-up | cases written |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['cases']} x {'x'.join(map(str, r['shape']))}, {r['classes']} classes | {r['parts']} | "
                  f"{r['one_process_seconds']:.1f} | {r['parts_seconds']:.1f} | {r['speedup']:.2f}x | {r['written']} |"
                  for r in parts]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=("run", "parts", "table"))
    parser.add_argument("--shape", type=int, nargs=3, default=[1000, 512, 512], help="z y x (voxels)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.5, 0.8, 0.8], help="z y x (mm)")
    parser.add_argument("--classes", type=int, default=105, help="classes, background included")
    parser.add_argument("--width-divisor", type=int, default=4)
    parser.add_argument("--source", type=Path, help="checkout whose autoseg predicts (default: this one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flags", default=DEFAULT_FLAGS, help="run: more `autoseg predict` options")
    parser.add_argument("--cases", type=int, default=8, help="parts: volumes in the folder")
    parser.add_argument("--parts", type=int, default=4, help="parts: processes")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_scale"))
    parser.add_argument("--out", type=Path, help="default: WORK/results.jsonl")
    args = parser.parse_args()
    args.out = args.out or args.work / "results.jsonl"
    args.work.mkdir(parents=True, exist_ok=True)
    if args.task == "run":
        run(args)
    elif args.task == "parts":
        run_parts(args)
    print(table(done_runs(args.out)))


if __name__ == "__main__":
    main()
