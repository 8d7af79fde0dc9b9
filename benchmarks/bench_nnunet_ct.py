"""Issue 16: a large CT file -> file, `nnUNetv2_predict` against `autoseg predict -m`, with a model nnU-Net trained.

Drives nnU-Net 2.8.1 from a separate venv, as bench_nnunet_model.py does (never an autoseg dependency).

prepare  writes a synthetic labelled CT dataset in nnU-Net's raw layout (Dataset991_SynthCT: --cases training
         scans of --train-shape voxels z y x at 1.5 x 0.8 x 0.8 mm, int16 HU: air, an elliptic body of soft
         tissue with noise, a spine, and two labelled organs, "liver" (1) and "kidneys" (2), of fixed size in mm
         at randomly shifted positions and scaled radii), one test scan of --shape (default 300 x 512 x 512) with
         its label, and a small warm-up scan; runs `nnUNetv2_plan_and_preprocess -c 3d_fullres`; divides the
         3d_fullres features by --width-divisor in nnUNetPlans.json (the network both tools then run: nnU-Net's
         plan, narrower so that a run of the large scan fits in minutes); trains fold 0 with nnU-Net's own
         trainer for one epoch of --iterations iterations on the CPU (its final validation skipped). Skips what
         exists.
compare  the test scan, file -> file, by `nnUNetv2_predict -device cpu`, with --monai by what a MONAI user
         writes (monai_ct_predict.py: nnU-Net's network, `sliding_window_inference`), and by each autoseg variant
         (`autoseg predict -m <nnU-Net's model folder> -f 0 --device cpu FLAGS`), without and/or with mirroring
         TTA, each in a fresh process, one after the other. Every autoseg variant first predicts the warm-up
         scan, untimed, so that the model's conversion and an engine's export and compilation are cached, as on
         a user's second run (the seconds of that first run are reported apart). Reported per run: wall
         seconds (process start, model load, reading, preprocessing, sliding window, export, writing), peak
         RSS (GiB, the largest process), voxels differing from nnU-Net's labels, Dice with nnU-Net's and with
         the truth per class, and whether the output's geometry equals the input's.

    python benchmarks/bench_nnunet_ct.py prepare --work /tmp/bct
    python benchmarks/bench_nnunet_ct.py compare --work /tmp/bct --tta off --variants \\
        autoseg="--precision fp32" openvino="--engine openvino --precision fp32" bf16="--precision bf16"
    python benchmarks/bench_nnunet_ct.py table --work /tmp/bct
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from bench_families import cpu_name, measured
from bench_nnunet_model import agreement, append_line, percent, read_lines, variant

DATASET = "Dataset991_SynthCT"
TRAINER = "nnUNetTrainer_benchShort"
SPACING = (1.5, 0.8, 0.8)  # mm, z y x
TEST_CASE = "ct_test"
WARMUP_CASE = "ct_warmup"
TOOL_NAMES = {"nnunet": "nnUNetv2_predict", "monai": "MONAI sliding_window_inference, nnU-Net's network"}

#: nnUNetv2_train / nnUNetv2_predict with one extra trainer: nnU-Net's own, one epoch of BENCH_ITERATIONS
#: iterations, no final validation (a few minutes on 2 cores instead of hours). Both entry points are given
#: the class directly (nnU-Net's search would import the Primus trainers, whose timm import fails beside the
#: CPU torch 2.13).
NNUNET_ENTRY = """
import os, sys, torch
import nnunetv2.inference.predict_from_raw_data as predict
import nnunetv2.run.run_training as training
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
class nnUNetTrainer_benchShort(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = int(os.environ.get("BENCH_ITERATIONS", "250"))
        self.num_val_iterations_per_epoch = 2
    def perform_actual_validation(self, save_probabilities=False):
        pass
training.recursive_find_trainer_class_by_name = predict.recursive_find_trainer_class_by_name = \\
    lambda *args, **kwargs: nnUNetTrainer_benchShort
task = sys.argv.pop(1)
sys.argv[0] = "nnUNetv2_" + task
{"train": training.run_training_entry, "predict": predict.predict_entry_point}[task]()
"""


def synthetic_ct(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(int16 HU image, uint8 label), z y x at SPACING. Organ sizes are in mm, so a larger field of view shows
    the same organs in a larger body."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    extent = [n * s for n, s in zip(shape, SPACING)]
    ymm = ((np.arange(y) - y / 2) * SPACING[1]).astype(np.float32)[:, None]
    xmm = ((np.arange(x) - x / 2) * SPACING[2]).astype(np.float32)[None, :]
    body = (ymm / (0.42 * extent[1])) ** 2 + (xmm / (0.45 * extent[2])) ** 2 <= 1
    spine = ((ymm - 0.3 * extent[1]) / 12) ** 2 + (xmm / 12) ** 2 <= 1
    shift = lambda: rng.uniform(-10, 10)  # noqa: E731  mm
    scale = lambda: rng.uniform(0.85, 1.15)  # noqa: E731
    z_centre = rng.uniform(-0.1, 0.1) * extent[0]
    # (label, HU, centre z y x in mm, semi-axes in mm)
    organs = [(1, 100, (z_centre, -25 + shift(), -45 + shift()), (60 * scale(), 45 * scale(), 55 * scale()))]
    for side in (-1, 1):
        organs.append((2, 200, (z_centre + shift(), 45 + shift(), side * 55 + shift()),
                       (35 * scale(), 20 * scale(), 18 * scale())))
    image = np.empty(shape, dtype=np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    base = np.where(body, 40, -1000).astype(np.int16)
    base[spine & body] = 700
    for k in range(z):
        zmm = (k - z / 2) * SPACING[0]
        plane = base + rng.integers(-30, 31, size=(y, x), dtype=np.int16) * body
        for value, hu, (cz, cy, cx), (az, ay, ax) in organs:
            inside = ((zmm - cz) / az) ** 2 + ((ymm - cy) / ay) ** 2 + ((xmm - cx) / ax) ** 2 <= 1
            inside &= body
            plane[inside] = hu + rng.integers(-20, 21, size=int(inside.sum()), dtype=np.int16)
            label[k][inside] = value
        image[k] = plane
    return image, label


def write_case(image_path: Path, label_path: Path, shape: tuple[int, int, int], seed: int) -> None:
    from autoseg.io.geometry import Geometry
    from autoseg.io.readers import write_image, write_label

    if image_path.is_file() and label_path.is_file():
        return
    image, label = synthetic_ct(shape, seed)
    geometry = Geometry(shape=shape, file_spacing=tuple(reversed(SPACING)), origin=(0.0, 0.0, 0.0),
                        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    for path in (image_path, label_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_image(image, geometry, image_path)
    write_label(label, geometry, label_path)


def nnunet_env(work: Path) -> dict[str, str]:
    folders = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    return {**os.environ, **{name: str(work / name) for name in folders}}


def model_folder(work: Path) -> Path:
    return work / "nnUNet_results" / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"


def narrow_plans(plans_file: Path, divisor: int) -> list[int]:
    """Divide the 3d_fullres features per stage by DIVISOR (at least 4) in nnU-Net's plans file, once."""
    plans = json.loads(plans_file.read_text())
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    if not plans.get("bench_width_divisor"):
        kwargs["features_per_stage"] = [max(f // divisor, 4) for f in kwargs["features_per_stage"]]
        plans["bench_width_divisor"] = divisor
        plans_file.write_text(json.dumps(plans, indent=2))
    return kwargs["features_per_stage"]


def run_prepare(args: argparse.Namespace) -> None:
    raw = args.work / "nnUNet_raw" / DATASET
    for i in range(args.cases):
        write_case(raw / "imagesTr" / f"ct_{i:03d}_0000.nii.gz", raw / "labelsTr" / f"ct_{i:03d}.nii.gz",
                   tuple(args.train_shape), seed=i)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {
        "background": 0, "liver": 1, "kidneys": 2}, "numTraining": args.cases, "file_ending": ".nii.gz"}))
    write_case(args.work / "test" / f"{TEST_CASE}_0000.nii.gz", args.work / "test_labels" / f"{TEST_CASE}.nii.gz",
               tuple(args.shape), seed=1000)
    write_case(args.work / "warmup" / f"{WARMUP_CASE}_0000.nii.gz",
               args.work / "warmup_labels" / f"{WARMUP_CASE}.nii.gz", (64, 128, 128), seed=1001)
    env = nnunet_env(args.work)
    plans_file = args.work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json"
    if not plans_file.is_file():
        measured([str(args.nnunet_bin / "nnUNetv2_plan_and_preprocess"), "-d", "991", "-c", "3d_fullres",
                  "-np", "2"], env, measure_rss=False)
    print("3d_fullres features per stage:", narrow_plans(plans_file, args.width_divisor), flush=True)
    if not (model_folder(args.work) / "fold_0" / "checkpoint_final.pth").is_file():
        seconds, _ = measured([str(args.nnunet_bin / "python"), "-c", NNUNET_ENTRY, "train", "991", "3d_fullres",
                               "0", "-tr", TRAINER, "-device", "cpu"],
                              {**env, "BENCH_ITERATIONS": str(args.iterations)}, measure_rss=False)
        print(f"nnU-Net training ({args.iterations} iterations): {seconds:.0f} s", flush=True)


def command(args: argparse.Namespace, inputs: Path, output: Path, tool: str, tta: bool) -> list[str]:
    """The command of one tool: "nnunet", "monai" (monai_ct_predict.py in nnU-Net's venv), or an autoseg variant."""
    if tool == "monai":
        return [str(args.nnunet_bin / "python"), str(Path(__file__).with_name("monai_ct_predict.py")),
                str(model_folder(args.work)), "0", str(inputs), str(output), *(["--tta"] if tta else [])]
    if tool == "nnunet":
        return [str(args.nnunet_bin / "python"), "-c", NNUNET_ENTRY, "predict", "-i", str(inputs), "-o", str(output),
                "-d", "991", "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-device", "cpu",
                *([] if tta else ["--disable_tta"])]
    return [sys.executable, "-m", "autoseg", "predict", "-i", str(inputs), "-o", str(output), "-m",
            str(model_folder(args.work)), "-f", "0", "--device", "cpu", *([] if tta else ["--no-tta"]),
            *args.variants[tool].split()]


def run_compare(args: argparse.Namespace) -> None:
    env = nnunet_env(args.work)
    tools = ["nnunet", *(["monai"] if args.monai else []), *args.variants]
    for tta in args.tta:
        runs: dict[str, dict] = {}
        outputs = {tool: args.work / f"out_{tool.replace(' ', '_')}_{'tta' if tta else 'notta'}" for tool in tools}
        for tool in tools:
            first = None
            if tool not in ("nnunet", "monai"):
                shutil.rmtree(args.work / "out_warmup", ignore_errors=True)
                print("warm-up: " + " ".join(command(args, args.work / "warmup", args.work / "out_warmup", tool, tta)))
                first = measured(command(args, args.work / "warmup", args.work / "out_warmup", tool, tta), env)
            shutil.rmtree(outputs[tool], ignore_errors=True)
            print("$ " + " ".join(command(args, args.work / "test", outputs[tool], tool, tta)), flush=True)
            seconds, rss = measured(command(args, args.work / "test", outputs[tool], tool, tta), env)
            runs[tool] = {"seconds": round(seconds, 1), "peak_rss_gib": round(rss, 2),
                          "warmup": None if first is None else {"seconds": round(first[0], 1),
                                                                 "peak_rss_gib": round(first[1], 2)}}
            print(json.dumps({tool: runs[tool]}), flush=True)
        result = {"task": "compare", "tta": tta, "shape": list(args.shape), "variants": args.variants, "runs": runs,
                  **agreement(outputs, [TEST_CASE], args.work / "test_labels", args.work / "test", 2),
                  "cpu": cpu_name()}
        append_line(args.out, result)
    print(table(read_lines(args.out)))


def table(results: list[dict]) -> str:
    lines = ["| TTA | tool | seconds | speed-up vs nnU-Net | peak RSS GiB | voxels differing from nnU-Net's | "
             "agreement with nnU-Net | agreement with autoseg fp32 | Dice vs truth (liver / kidneys) | "
             "geometry = input | warm-up run (cache filled): s, GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        reference = result["runs"]["nnunet"]["seconds"]
        for tool, run in result["runs"].items():
            row = result[tool]
            name = TOOL_NAMES.get(tool) or f"autoseg predict -m {result['variants'][tool]}".strip()
            warmup = "-" if run["warmup"] is None else f"{run['warmup']['seconds']}, {run['warmup']['peak_rss_gib']}"
            lines.append(
                f"| {'8 flips' if result['tta'] else 'off'} | {name} | {run['seconds']} | "
                f"**{reference / run['seconds']:.2f}x** | {run['peak_rss_gib']} | {row['voxels_differing']:,} of "
                f"{result['voxels']:,} | {100 * row['agreement']:.3f} % | "
                f"{percent(row['agreement_with_autoseg'])} | "
                f"{' / '.join(map(str, row['dice_vs_truth']))} | {'yes' if row['geometry_equals_input'] else 'NO'} | "
                f"{warmup} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["prepare", "compare", "table"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_nnunet_ct"))
    parser.add_argument("--nnunet-bin", type=Path, default=Path("/tmp/nnunet-venv/bin"))
    parser.add_argument("--cases", type=int, default=5, help="training scans")
    parser.add_argument("--train-shape", type=int, nargs=3, default=[128, 384, 384], help="z y x voxels")
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], help="the test scan, z y x voxels")
    parser.add_argument("--width-divisor", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=60, help="nnU-Net training iterations (one epoch)")
    parser.add_argument("--tta", type=lambda s: s == "on", nargs="+", default=[False], help="on and/or off")
    parser.add_argument("--variants", type=variant, nargs="+", default=[("autoseg", "--precision fp32")],
                        help='autoseg runs as NAME=FLAGS (default: autoseg="--precision fp32")')
    parser.add_argument("--monai", action="store_true", help="also the MONAI script (monai in nnU-Net's venv)")
    parser.add_argument("--out", type=Path, default=None, help="JSON lines (default WORK/results.jsonl)")
    args = parser.parse_args()
    args.out = args.out or args.work / "results.jsonl"
    args.variants = dict(args.variants)
    args.work.mkdir(parents=True, exist_ok=True)
    {"prepare": run_prepare, "compare": run_compare,
     "table": lambda a: print(table(read_lines(a.out)))}[args.task](args)


if __name__ == "__main__":
    main()
