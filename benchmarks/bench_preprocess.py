"""Benchmark `preprocess` (3d_fullres) against nnU-Net v2 in one run: seconds and peak RSS.

Usage:
    python benchmarks/bench_preprocess.py --nnunet-python PATH [--skip-large]

Datasets: the real Hippocampus set (../shared/data) and a large synthetic CT set (3 cases of about
512 x 512 x 300 voxels at 0.7-0.9 x 0.7-0.9 x 2.0-3.0 mm, so two of the three are resampled).
Each tool plans in a process of its own first (untimed), then preprocesses with 2 worker processes in a
fresh process; we report the wall time of the preprocessing call, the peak RSS of the main process
and the largest peak RSS of any worker process (ru_maxrss of RUSAGE_SELF / RUSAGE_CHILDREN), and
the size of the cache on disk. Linux carries a parent's peak RSS into its children, so each figure
is at least the launching process's peak (small here: the large data are written by a separate process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
REAL = HERE.parents[2] / "shared" / "data" / "Dataset004_Hippocampus"

AUTOSEG_PLAN = """
import sys
from autoseg import api
api.plan(sys.argv[1], workers=2)
print("{}")
"""

AUTOSEG = """
import json, resource, sys, time
from autoseg import api
t = time.perf_counter(); api.preprocess(sys.argv[1], configurations=("3d_fullres",), workers=2)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

NNUNET_PLAN = """
import contextlib, io, sys
from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
did = int(sys.argv[1])
with contextlib.redirect_stdout(io.StringIO()):
    extract_fingerprints([did], num_processes=2, clean=True, verbose=False, show_progress_bar=False)
    plan_experiments([did])
print("{}")
"""

NNUNET = """
import contextlib, io, json, resource, sys, time
from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess
did = int(sys.argv[1])
with contextlib.redirect_stdout(io.StringIO()):
    t = time.perf_counter()
    preprocess([did], configurations=("3d_fullres",), num_processes=(2,), verbose=False)
    seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def large_ct(root: Path, n_cases: int = 3) -> Path:
    """Write a raw dataset of large synthetic CTs (nnU-Net layout) and return its folder."""
    from autoseg.io import Geometry, write_image

    spacings = [(0.8, 0.8, 2.5), (0.7, 0.7, 2.0), (0.9, 0.9, 3.0)]
    folder = root / "Dataset951_LargeCT"
    rng = np.random.default_rng(0)
    for i in range(n_cases):
        spacing = spacings[i % len(spacings)]
        shape = (300, 512, 512)
        z, y, x = np.ogrid[-1:1:shape[0] * 1j, -1:1:shape[1] * 1j, -1:1:shape[2] * 1j]
        body = np.broadcast_to((y / 0.8) ** 2 + (x / 0.9) ** 2 < 1, shape)
        organ = ((z / 0.5) ** 2 + ((y - 0.1) / 0.35) ** 2 + ((x + 0.2) / 0.3) ** 2) < 1
        lesion = ((z / 0.15) ** 2 + ((y - 0.1) / 0.1) ** 2 + ((x + 0.1) / 0.1) ** 2) < 1
        image = np.where(body, 40, -1000).astype(np.int16)
        image[organ] = 90
        image[lesion] = 130
        image += rng.normal(0, 15, size=shape).astype(np.int16)
        label = (organ & body).astype(np.uint8) + (lesion & body).astype(np.uint8)
        geometry = Geometry(shape=shape, file_spacing=spacing, origin=(0.0, 0.0, 0.0),
                            direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
        write_image(image, geometry, folder / "imagesTr" / f"ct_{i:03d}_0000.nii.gz")
        write_image(label, geometry, folder / "labelsTr" / f"ct_{i:03d}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": n_cases, "file_ending": ".nii.gz"}))
    return folder


def run(python: str, program: str, argument: str, env: dict[str, str]) -> dict:
    result = subprocess.run([python, "-c", program, argument], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def compare(raw: Path, dataset_id: int, nnunet_python: str | None, scratch: Path) -> list[str]:
    raw_root = scratch / f"raw{dataset_id}"
    raw_root.mkdir()
    name = f"Dataset{dataset_id:03d}_{raw.name.split('_', 1)[1]}"
    (raw_root / name).symlink_to(raw)
    env = dict(os.environ, AUTOSEG_RAW=str(raw_root), AUTOSEG_PREPROCESSED=str(scratch / f"a{dataset_id}"))
    run(sys.executable, AUTOSEG_PLAN, name, env)
    ours = run(sys.executable, AUTOSEG, name, env)
    ours_mb = folder_mb(scratch / f"a{dataset_id}" / name / "autoseg_3d_fullres")
    rows = [f"| {name} | autoseg | {ours['seconds']:.2f} | {ours['main_mb']:.0f} | {ours['worker_mb']:.0f} | "
            f"{ours_mb:.0f} | {folder_mb(raw):.0f} |"]
    if nnunet_python:
        nn_env = dict(env, nnUNet_raw=str(raw_root), nnUNet_preprocessed=str(scratch / f"n{dataset_id}"),
                      nnUNet_results=str(scratch / "res"))
        run(nnunet_python, NNUNET_PLAN, str(dataset_id), nn_env)
        theirs = run(nnunet_python, NNUNET, str(dataset_id), nn_env)
        theirs_mb = folder_mb(scratch / f"n{dataset_id}" / name / "nnUNetPlans_3d_fullres")
        rows.append(f"| {name} | nnU-Net v2.8.1 | {theirs['seconds']:.2f} | {theirs['main_mb']:.0f} | "
                    f"{theirs['worker_mb']:.0f} | {theirs_mb:.0f} | {folder_mb(raw):.0f} |")
        rows.append(f"| {name} | ratio nnU-Net / autoseg | {theirs['seconds'] / ours['seconds']:.1f}x | "
                    f"{theirs['main_mb'] / ours['main_mb']:.1f}x | {theirs['worker_mb'] / ours['worker_mb']:.1f}x"
                    f" | {theirs_mb / ours_mb:.2f}x | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nnunet-python", default=None)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--make-large", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_large:
        large_ct(args.make_large)
        return
    print("| dataset | tool | preprocess s | main peak MB | worker peak MB | cache MB | raw MB |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        if not args.skip_real:
            for row in compare(REAL, 4, args.nnunet_python, scratch):
                print(row, flush=True)
        if not args.skip_large:
            # written by a child process: Linux carries a parent's peak RSS into the children it starts
            subprocess.run([sys.executable, str(HERE), "--make-large", str(scratch / "large")], check=True)
            large = scratch / "large" / "Dataset951_LargeCT"
            for row in compare(large, 951, args.nnunet_python, scratch):
                print(row, flush=True)


if __name__ == "__main__":
    main()
