"""Benchmark the first stages (check, fingerprint, plan) against nnU-Net v2 in one run.

Usage:
    python benchmarks/bench_foundation.py [DATASET_FOLDER] [--nnunet-python PATH] [--repeats N]

DATASET_FOLDER defaults to ../shared/data/Dataset004_Hippocampus. With --nnunet-python (the python
of a separate venv holding `nnunetv2==2.8.1`), nnU-Net's integrity check, fingerprint extraction and
planning run on the same data in the same session, each timed inside its own process after imports,
and the ratios are printed. Both sides use 2 worker processes. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset004_Hippocampus"

AUTOSEG_PHASES = """
import json, os, sys, time
t0 = time.perf_counter()
from autoseg import api
from autoseg.dataset.check import check_dataset
from autoseg.dataset.load import load_dataset
from autoseg.fingerprint import extract_fingerprint
from autoseg.planning import plan
t_import = time.perf_counter() - t0
folder = sys.argv[1]
t = time.perf_counter(); problems = check_dataset(folder, workers=2); t_check = time.perf_counter() - t
dataset = load_dataset(folder)
t = time.perf_counter(); fp = extract_fingerprint(dataset, workers=2); t_fp = time.perf_counter() - t
t = time.perf_counter(); plans = plan(fp, dataset, memory_budget_gb=8.0); t_plan = time.perf_counter() - t
full = plans.configurations["3d_fullres"]
print(json.dumps({"import": t_import, "check": t_check, "fingerprint": t_fp, "plan": t_plan,
                  "errors": sum(p.severity == "error" for p in problems),
                  "plan_3d": [list(full.patch_size), full.batch_size]}))
"""

NNUNET_PHASES = """
import json, os, sys, time, io, contextlib
t0 = time.perf_counter()
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
t_import = time.perf_counter() - t0
folder = sys.argv[1]
with contextlib.redirect_stdout(io.StringIO()):
    t = time.perf_counter(); verify_dataset_integrity(folder, num_processes=2); t_check = time.perf_counter() - t
    t = time.perf_counter()
    extract_fingerprints([4], num_processes=2, clean=True, verbose=False, show_progress_bar=False)
    t_fp = time.perf_counter() - t
    t = time.perf_counter(); plan_experiments([4]); t_plan = time.perf_counter() - t
plans = json.load(open(os.path.join(os.environ["nnUNet_preprocessed"], os.path.basename(folder), "nnUNetPlans.json")))
full = plans["configurations"]["3d_fullres"]
print(json.dumps({"import": t_import, "check": t_check, "fingerprint": t_fp, "plan": t_plan,
                  "plan_3d": [full["patch_size"], full["batch_size"]]}))
"""


def run_phases(python: str, program: str, folder: Path, env: dict[str, str]) -> dict:
    result = subprocess.run([python, "-c", program, str(folder)], capture_output=True, text=True,
                            env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"benchmark process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def best_of(repeats: int, python: str, program: str, folder: Path, env: dict[str, str]) -> dict:
    runs = [run_phases(python, program, folder, env) for _ in range(repeats)]
    best = dict(runs[0])
    for key in ("import", "check", "fingerprint", "plan"):
        best[key] = min(r[key] for r in runs)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--nnunet-python", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = args.dataset.resolve()
    with tempfile.TemporaryDirectory() as scratch:
        env = dict(os.environ, AUTOSEG_PREPROCESSED=f"{scratch}/a_pre", OMP_NUM_THREADS="1")
        ours = best_of(args.repeats, sys.executable, AUTOSEG_PHASES, folder, env)
        theirs = None
        if args.nnunet_python:
            raw = Path(scratch) / "raw"
            raw.mkdir()
            (raw / "Dataset004_Hippocampus").symlink_to(folder)
            nn_env = dict(env, nnUNet_raw=str(raw), nnUNet_preprocessed=f"{scratch}/nn_pre",
                          nnUNet_results=f"{scratch}/nn_res")
            theirs = best_of(args.repeats, args.nnunet_python, NNUNET_PHASES, raw / folder.name, nn_env)
    print(f"dataset: {folder.name}; best of {args.repeats} runs; seconds\n")
    print("| phase | autoseg | nnU-Net v2 | nnU-Net / autoseg |\n|---|---|---|---|")
    for key in ("import", "check", "fingerprint", "plan"):
        other = f"{theirs[key]:.4f}" if theirs else "-"
        ratio = f"{theirs[key] / ours[key]:.1f}x" if theirs else "-"
        print(f"| {key} | {ours[key]:.4f} | {other} | {ratio} |")
    print(f"\n3d_fullres patch, batch: autoseg {ours['plan_3d']}"
          + (f"; nnU-Net {theirs['plan_3d']}" if theirs else ""))


if __name__ == "__main__":
    main()
