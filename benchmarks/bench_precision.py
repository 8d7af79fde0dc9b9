"""bf16 against fp32 on a trained model: labels, Dice against the truth, time (issue 16's rule for `auto`).

Predicts one folder of scans file -> file with each variant of `autoseg predict` (the model's folds, TTA on
unless --no-tta), then reports per variant: voxels whose label differs from the fp32 variant's, Dice against
the ground truth per class (autoseg evaluate's Dice, mean over cases) and wall seconds. The issue's rule for
making bf16 `--precision auto`'s CPU choice: argmax agreement >= 99.5 % and Dice within 0.005 per class.

    python benchmarks/bench_precision.py -m /tmp/bf/results/Dataset004_Hippocampus/3d_fullres__autoseg \
        -i /tmp/bnn/input_fold0 --labels ../shared/data/Dataset004_Hippocampus/labelsTr --work /tmp/bf16cmp
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_families import cpu_name

VARIANTS = {"fp32": "--precision fp32", "bf16": "--precision bf16", "ovfp32": "--engine openvino --precision fp32",
            "ovbf16": "--engine openvino --precision bf16"}


def predict(model: Path, inputs: Path, output: Path, flags: str, tta: bool) -> float:
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "autoseg", "predict", "-i", str(inputs), "-o", str(output), "-m", str(model),
               "--device", "cpu", *([] if tta else ["--no-tta"]), *flags.split()]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def compare(outputs: dict[str, Path], labels: Path, classes: int) -> dict[str, dict]:
    from autoseg.evaluation.metrics import confusion_counts, dice_score
    from autoseg.io.readers import read_label

    cases = sorted(p.name for p in outputs["fp32"].glob("*.nii.gz"))
    differing = {name: 0 for name in outputs}
    dice: dict[str, list[list[float]]] = {name: [[] for _ in range(classes)] for name in outputs}
    voxels = 0
    for case in cases:
        truth, reference = read_label(labels / case)[0], read_label(outputs["fp32"] / case)[0]
        voxels += reference.size
        for name, folder in outputs.items():
            label = read_label(folder / case)[0]
            differing[name] += int((label != reference).sum())
            for c in range(1, classes + 1):
                dice[name][c - 1].append(dice_score(confusion_counts(label == c, truth == c)))
    return {name: {"cases": len(cases), "voxels_differing_from_fp32": differing[name],
                   "agreement_with_fp32": 1 - differing[name] / voxels,
                   "dice_vs_truth": [round(float(np.nanmean(d)), 4) for d in dice[name]]} for name in outputs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", type=Path, required=True, help="a model folder (autoseg's or nnU-Net's)")
    parser.add_argument("-i", "--inputs", type=Path, required=True, help="scans (CASE_0000<ending>)")
    parser.add_argument("--labels", type=Path, required=True, help="ground truth CASE<ending>")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-tta", dest="tta", action="store_false")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_precision"))
    args = parser.parse_args()
    variants = ["fp32", *[v for v in args.variants if v != "fp32"]]
    outputs = {name: args.work / name for name in variants}
    seconds = {name: round(predict(args.model, args.inputs, outputs[name], VARIANTS[name], args.tta), 1)
               for name in variants}
    classes = len(json.loads((args.model / "dataset.json").read_text())["labels"]) - 1
    result = {"model": str(args.model), "tta": args.tta, "seconds": seconds, "cpu": cpu_name(),
              **compare(outputs, args.labels, classes)}
    print(json.dumps(result))
    with (args.work / "results.jsonl").open("a") as handle:
        handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
