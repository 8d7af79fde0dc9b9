"""A model trained by nnU-Net itself, predicted by nnU-Net and by `autoseg predict -m` (issue 17).

Two tasks, both driving nnU-Net 2.8.1 from a separate venv (never an autoseg dependency: `python3 -m venv
/tmp/nnunet-venv && /tmp/nnunet-venv/bin/pip install torch==2.13.0 && /tmp/nnunet-venv/bin/pip install
nnunetv2==2.8.1 torch==2.13.0`):

train    nnU-Net's own pipeline on the real Dataset004_Hippocampus (../shared/data): `nnUNetv2_plan_and_preprocess
         -d 4 -c 3d_fullres`, then `nnUNetv2_train 4 3d_fullres 0 -tr nnUNetTrainer_1epoch -device cpu`
         (250 iterations). Skips what exists.
compare  fold 0's validation images (nnU-Net's splits_final.json), file -> file, `nnUNetv2_predict ... -device
         cpu` and `autoseg predict -m <the nnU-Net model folder> -f 0 --device cpu`, each with and without
         mirroring TTA, interleaved (nnU-Net, autoseg, autoseg, nnU-Net, ... over --rounds), every run into an
         empty folder, each tool with its default worker counts. Reported: wall seconds per run (the command,
         process start and model load included) and their ratio, voxel agreement between the two label maps
         (all voxels of all cases), Dice between them per class, each tool's Dice against the ground truth,
         and whether every output's geometry equals its input's.

    python benchmarks/bench_nnunet_model.py train --work /tmp/bnn
    python benchmarks/bench_nnunet_model.py compare --work /tmp/bnn --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_families import cpu_name
from bench_learning import DEFAULT_RAW

DATASET = "Dataset004_Hippocampus"
TRAINER = "nnUNetTrainer_1epoch"

#: nnUNetv2_train / nnUNetv2_predict, except that the trainer class is imported from its module: nnU-Net's own
#: search imports every trainer module, the Primus ones too, whose timm import needs a torchvision that does
#: not exist for the CPU torch 2.13 (it only skips nnU-Net's import of ~100 modules: not a speed-up of its own).
NNUNET_ENTRY = """
import importlib, sys
import nnunetv2.inference.predict_from_raw_data as predict
import nnunetv2.run.run_training as training
MODULE = "nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs"
def find(name):
    return getattr(importlib.import_module(MODULE), name)
training.recursive_find_trainer_class_by_name = predict.recursive_find_trainer_class_by_name = find
task = sys.argv.pop(1)
sys.argv[0] = "nnUNetv2_" + task
{"train": training.run_training_entry, "predict": predict.predict_entry_point}[task]()
"""


def nnunet_env(work: Path, raw: Path) -> dict[str, str]:
    """nnU-Net's three folders under WORK; the raw one links to the shared dataset (read, never written)."""
    raw_root = work / "nnUNet_raw"
    raw_root.mkdir(parents=True, exist_ok=True)
    if not (raw_root / DATASET).exists():
        (raw_root / DATASET).symlink_to((raw / DATASET).resolve())
    return {**os.environ, "nnUNet_raw": str(raw_root), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
            "nnUNet_results": str(work / "nnUNet_results")}


def model_folder(work: Path) -> Path:
    return work / "nnUNet_results" / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"


def timed(command: list[str], env: dict[str, str]) -> float:
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    return time.perf_counter() - started


def run_train(args: argparse.Namespace) -> None:
    env = nnunet_env(args.work, args.raw)
    binaries = args.nnunet_bin
    if not (args.work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json").is_file():
        timed([str(binaries / "nnUNetv2_plan_and_preprocess"), "-d", "4", "-c", "3d_fullres", "-np", "2"], env)
    if not (model_folder(args.work) / "fold_0" / "checkpoint_final.pth").is_file():
        seconds = timed([str(binaries / "python"), "-c", NNUNET_ENTRY, "train", "4", "3d_fullres", "0",
                         "-tr", TRAINER, "-device", "cpu"], env)
        print(f"nnU-Net training: {seconds:.0f} s", flush=True)


def validation_inputs(work: Path, raw: Path) -> tuple[Path, list[str]]:
    """A folder of links to fold 0's validation images (CASE_0000.nii.gz), and the case ids."""
    splits = json.loads((work / "nnUNet_preprocessed" / DATASET / "splits_final.json").read_text())
    cases = sorted(splits[0]["val"])
    folder = work / "input_fold0"
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        link = folder / f"{case}_0000.nii.gz"
        if not link.exists():
            link.symlink_to((raw / DATASET / "imagesTr" / link.name).resolve())
    return folder, cases


def commands(args: argparse.Namespace, inputs: Path, output: Path, tool: str, tta: bool) -> list[str]:
    """The command of one tool: "nnunet", or an autoseg variant ("autoseg" or "autoseg NAME")."""
    if tool == "nnunet":
        return [str(args.nnunet_bin / "python"), "-c", NNUNET_ENTRY, "predict", "-i", str(inputs),
                "-o", str(output), "-d", "4", "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-device", "cpu",
                *([] if tta else ["--disable_tta"])]
    return [sys.executable, "-m", "autoseg", "predict", "-i", str(inputs), "-o", str(output),
            "-m", str(model_folder(args.work)), "-f", "0", "--device", "cpu", *([] if tta else ["--no-tta"]),
            *args.variants[tool].split()]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """autoseg evaluate's Dice (NaN when both masks are empty, left out of the means)."""
    from autoseg.evaluation.metrics import confusion_counts, dice_score

    return dice_score(confusion_counts(a, b))


def agreement(outputs: dict[str, Path], cases: list[str], truth_folder: Path, image_folder: Path,
              classes: int) -> dict:
    """Per tool: voxels differing from nnU-Net's labels, Dice with nnU-Net's and with the ground truth per class
    (mean over cases), and whether every output's geometry equals its input's. TRUTH_FOLDER holds CASE.nii.gz,
    IMAGE_FOLDER CASE_0000.nii.gz."""
    from autoseg.io.readers import read_header, read_label

    stats = {tool: {"differing": 0, "differing_from_autoseg": 0, "between": [[] for _ in range(classes)],
                    "truth": [[] for _ in range(classes)], "geometry_ok": True} for tool in outputs}
    voxels = 0
    for case in cases:
        reference, _ = read_label(truth_folder / f"{case}.nii.gz")
        image_geometry, _ = read_header(image_folder / f"{case}_0000.nii.gz")
        labels = {tool: read_label(folder / f"{case}.nii.gz") for tool, folder in outputs.items()}
        voxels += reference.size
        for tool, (label, geometry) in labels.items():
            entry = stats[tool]
            entry["geometry_ok"] &= (geometry.shape == image_geometry.shape
                                     and max(geometry.differences(image_geometry).values()) < 1e-4)
            entry["differing"] += int((label != labels["nnunet"][0]).sum())
            entry["differing_from_autoseg"] += int((label != labels["autoseg"][0]).sum()) if "autoseg" in labels else 0
            for c in range(1, classes + 1):
                entry["between"][c - 1].append(dice(label == c, labels["nnunet"][0] == c))
                entry["truth"][c - 1].append(dice(label == c, reference == c))
    mean = lambda values: [round(float(np.nanmean(v)), 4) for v in values]  # noqa: E731
    return {"voxels": voxels, **{tool: {"voxels_differing": e["differing"], "agreement": 1 - e["differing"] / voxels,
                                        "agreement_with_autoseg": (1 - e["differing_from_autoseg"] / voxels
                                                                   if "autoseg" in outputs else None),
                                        "dice_with_nnunet": mean(e["between"]), "dice_vs_truth": mean(e["truth"]),
                                        "geometry_equals_input": e["geometry_ok"]} for tool, e in stats.items()}}


def run_compare(args: argparse.Namespace) -> None:
    env = nnunet_env(args.work, args.raw)
    inputs, cases = validation_inputs(args.work, args.raw)
    classes = len(json.loads((args.raw / DATASET / "dataset.json").read_text())["labels"]) - 1
    tools = ["nnunet", *args.variants]
    for tta in args.tta:
        seconds: dict[str, list[float]] = {tool: [] for tool in tools}
        outputs = {tool: args.work / f"out_{tool.replace(' ', '_')}_{'tta' if tta else 'notta'}" for tool in tools}
        for round_index in range(args.rounds):
            for tool in tools if round_index % 2 == 0 else reversed(tools):
                shutil.rmtree(outputs[tool], ignore_errors=True)
                seconds[tool].append(timed(commands(args, inputs, outputs[tool], tool, tta), env))
        result = {"task": "compare", "tta": tta, "cases": len(cases), "rounds": args.rounds,
                  "variants": args.variants, "seconds": {t: [round(s, 1) for s in v] for t, v in seconds.items()},
                  **agreement(outputs, cases, args.raw / DATASET / "labelsTr", inputs, classes), "cpu": cpu_name()}
        print(json.dumps(result), flush=True)
        append_line(args.out, result)
    print(table(read_lines(args.out)))


def append_line(path: Path, result: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(result) + "\n")


def percent(fraction: float | None) -> str:
    """A fraction as a table cell; "-" where it was not measured (no torch fp32 run named "autoseg")."""
    return "-" if fraction is None else f"{100 * fraction:.3f} %"


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def table(runs: list[dict]) -> str:
    lines = ["| TTA | cases | tool | seconds (runs) | speed-up vs nnU-Net (best/best) | voxels differing from "
             "nnU-Net's | agreement with nnU-Net | agreement with autoseg fp32 | Dice with nnU-Net's (per class) | "
             "Dice vs truth (per class) | geometry = input |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in (r for r in runs if r["task"] == "compare"):
        best_nnunet = min(run["seconds"]["nnunet"])
        for tool, seconds in run["seconds"].items():
            row = run[tool]
            name = "nnUNetv2_predict" if tool == "nnunet" else f"autoseg predict -m {run['variants'][tool]}".strip()
            lines.append(
                f"| {'8 flips' if run['tta'] else 'off'} | {run['cases']} | {name} | {', '.join(map(str, seconds))} "
                f"| **{best_nnunet / min(seconds):.2f}x** | {row['voxels_differing']:,} of {run['voxels']:,} | "
                f"{100 * row['agreement']:.3f} % | {percent(row.get('agreement_with_autoseg', 1))} | "
                f"{' / '.join(map(str, row['dice_with_nnunet']))} | "
                f"{' / '.join(map(str, row['dice_vs_truth']))} | {'yes' if row['geometry_equals_input'] else 'NO'} |")
    return "\n".join(lines)


def variant(text: str) -> tuple[str, str]:
    name, _, flags = text.partition("=")
    return (f"autoseg {name}" if name != "autoseg" else name), flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["train", "compare", "table"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_nnunet_model"))
    parser.add_argument("--raw", type=Path, default=DEFAULT_RAW, help="folder holding Dataset004_Hippocampus")
    parser.add_argument("--nnunet-bin", type=Path, default=Path("/tmp/nnunet-venv/bin"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tta", type=lambda s: s == "on", nargs="+", default=[False, True],
                        help="on and/or off (default: both)")
    parser.add_argument("--variants", type=variant, nargs="+", default=[("autoseg", "")],
                        help='autoseg runs as NAME=FLAGS, e.g. autoseg= openvino="--engine openvino" '
                             'bf16="--precision bf16" (default: autoseg with its defaults)')
    parser.add_argument("--out", type=Path, default=None, help="JSON lines (default WORK/results.jsonl)")
    args = parser.parse_args()
    args.out = args.out or args.work / "results.jsonl"
    args.variants = dict(args.variants)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.task == "train":
        run_train(args)
    elif args.task == "compare":
        run_compare(args)
    else:
        print(table(read_lines(args.out)))


if __name__ == "__main__":
    main()
