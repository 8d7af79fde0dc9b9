"""Every network family side by side (issue 14): accuracy, size, speed and memory on one machine, in one run.

Two tasks:

real   per family (default: every registered one), on the real Dataset004_Hippocampus (../shared/data):
       `autoseg plan DATASET --network NAME`, `autoseg preprocess DATASET -c 3d_fullres -p NAME` (the
       families share the default plans' cache: only the first one preprocesses), `autoseg train DATASET
       3d_fullres 0 -p NAME --epochs E --iterations-per-epoch I --seed S` with the training defaults of the
       time, then `autoseg predict` of the first --predict-cases validation images of fold 0 with that fold
       (default TTA). Reported: validation Dice per class (fold 0's end-of-training validation, full cases,
       sliding window, TTA), parameters, receptive field, patch and batch of the plan, seconds per training
       iteration (metrics.jsonl's epoch seconds / iterations), prediction seconds per case (the predict
       command's wall time / cases: it includes the process start and model load, a few seconds), the
       planner's estimated GPU training memory and the measured peak RSS of the training process (CPU,
       fp32, no AMP: not the same quantity; their ratio across families shows whether the estimator
       ranks the families right).
ct     prediction time on a synthetic CT-like volume (default 1 x 160 x 320 x 320, already normalised)
       with the networks of a CT stage plan (patch 128^3, 6 stages, 3x3x3 convs, 32-320 features: nnU-Net's
       abdominal-CT 3d_fullres shape) mapped by each family (default: enet and unet), random weights
       (seed 0), autoseg's sliding window (step 0.5, Gaussian, no TTA unless --tta), fp32, one tile per
       forward pass; each family in a fresh process (seconds, tiles, peak RSS).

pairs  every pair of families that `real` trained with the same budget and seed: fold 0's validation
       probabilities averaged (`autoseg ensemble`) and evaluated on the same cases; the table lists the best
       pairs next to the best single family (issue 15: does combining families trained differently help?).

Each run appends one JSON line to --out (a rerun skips what is there); the Markdown tables are printed at
the end (`table` prints them from --out alone).

    python benchmarks/bench_families.py real --iterations 250 --work /tmp/bf
    python benchmarks/bench_families.py real --families unet enet --iterations 250 --work /tmp/bf
    python benchmarks/bench_families.py pairs --work /tmp/bf
    python benchmarks/bench_families.py ct --families enet unet --work /tmp/bf
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_learning import DEFAULT_RAW, done_runs, summary_dice

from autoseg.serialization import to_jsonable

#: Runs a command and prints the largest RSS (KiB) of its process tree's members to stderr.
RSS_WRAPPER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
               "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(code)")


def autoseg(*arguments: str, env: dict[str, str], measure_rss: bool = False) -> tuple[float, float | None]:
    """Run `autoseg ARGUMENTS` (check=True); (wall seconds, peak RSS GiB of the command or None)."""
    print("autoseg " + " ".join(arguments), flush=True)
    return measured([sys.executable, "-m", "autoseg", *arguments], env=env, measure_rss=measure_rss)


def measured(command: list[str], env: dict[str, str], measure_rss: bool = True) -> tuple[float, float | None]:
    """Run COMMAND (exit on failure); (wall seconds, peak RSS GiB of its largest process, or None)."""
    if measure_rss:
        command = [sys.executable, "-c", RSS_WRAPPER, *command]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, stderr=subprocess.PIPE if measure_rss else None, text=True)
    seconds = time.perf_counter() - started
    rss = None
    if measure_rss:
        lines = result.stderr.splitlines()
        sys.stderr.write("\n".join(line for line in lines[-40:] if not line.startswith("PEAK_RSS_KIB")) + "\n")
        rss = next(int(line.split()[1]) / 2**20 for line in lines if line.startswith("PEAK_RSS_KIB"))
    if result.returncode:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}")
    return seconds, rss


def fold0_validation_images(location, ending: str, count: int) -> list[Path]:
    """The image files (channel 0) of the first `count` validation cases of fold 0."""
    from autoseg.training.splits import fold_cases, load_or_create_splits

    ids = sorted(path.name[: -len(ending)] for path in (location.raw / "labelsTr").glob(f"*{ending}"))
    _, val = fold_cases(load_or_create_splits(location.preprocessed, ids, extra=[location.raw]), 0, ids)
    return [location.raw / "imagesTr" / f"{case}_0000{ending}" for case in sorted(val)[:count]]


def run_real(args: argparse.Namespace) -> None:
    from autoseg.dataset.load import load_dataset
    from autoseg.model.families import NETWORKS
    from autoseg.paths import resolve_dataset
    from autoseg.planning.contract import Plans
    from autoseg.planning.identifier import plans_file_name, plans_identifier
    from autoseg.serialization import load_contract

    env = {**os.environ, "AUTOSEG_RAW": os.environ.get("AUTOSEG_RAW", str(args.raw)),
           "AUTOSEG_PREPROCESSED": str(args.work / "preprocessed"), "AUTOSEG_RESULTS": str(args.work / "results")}
    os.environ.update(env)
    for name in args.families or sorted(NETWORKS):
        key = {"task": "real", "family": name, "dataset": args.dataset, "epochs": args.epochs,
               "iterations": args.iterations, "seed": args.seed}
        if any(all(run.get(k) == v for k, v in key.items()) for run in done_runs(args.out)):
            continue
        identifier = plans_identifier(name)
        budget = ["--epochs", str(args.epochs), "--iterations-per-epoch", str(args.iterations)]
        autoseg("plan", args.dataset, "--network", name, env=env)
        autoseg("preprocess", args.dataset, "-c", "3d_fullres", "-p", identifier, env=env)
        train_seconds, rss = autoseg("train", args.dataset, "3d_fullres", "0", "-p", identifier, *budget,
                                     "--seed", str(args.seed), env=env, measure_rss=True)
        location = resolve_dataset(args.dataset)
        plans = load_contract(location.preprocessed / plans_file_name(identifier), Plans, rerun="autoseg plan")
        config = plans.configurations["3d_fullres"]
        fold = location.results / f"3d_fullres__{identifier}" / "fold_0"
        metrics = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
        images = fold0_validation_images(location, load_dataset(location.raw).file_ending, args.predict_cases)
        inputs = args.work / "predict_in"
        inputs.mkdir(parents=True, exist_ok=True)
        for image in images:
            if not (inputs / image.name).exists():
                (inputs / image.name).symlink_to(image)
        predict_seconds, _ = autoseg("predict", "-i", str(inputs), "-o", str(args.work / f"predicted_{name}"),
                                     "-d", args.dataset, "-c", "3d_fullres", "-f", "0", "-p", identifier,
                                     "--overwrite", env=env)
        result = {**key, "parameters": config.parameter_count, "receptive_field": list(config.receptive_field),
                  "patch": list(config.patch_size), "batch": config.batch_size,
                  "estimated_gb": round(config.estimated_memory_gb, 2), "train_peak_rss_gb": round(rss, 2),
                  "train_seconds": round(train_seconds, 1),
                  "seconds_per_iteration": round(sum(m.get("train_seconds", m["epoch_seconds"]) for m in metrics)
                                                 / (args.epochs * args.iterations), 3),
                  "predict_seconds_per_case": round(predict_seconds / len(images), 2),
                  "validation_dice": summary_dice(json.loads((fold / "validation" / "summary.json").read_text())),
                  "pseudo_dice": metrics[-1]["pseudo_dice"], "cpu": cpu_name()}
        with args.out.open("a") as handle:
            handle.write(json.dumps(result) + "\n")


def run_pairs(args: argparse.Namespace) -> None:
    """Every pair of families trained by `real` (same budget and seed): fold 0's validation probabilities
    averaged (`autoseg ensemble`) and evaluated on the same cases as each member; one line per pair."""
    from itertools import combinations

    from autoseg import api
    from autoseg.paths import resolve_dataset
    from autoseg.planning.identifier import plans_identifier

    os.environ.update({"AUTOSEG_RAW": os.environ.get("AUTOSEG_RAW", str(args.raw)),
                       "AUTOSEG_PREPROCESSED": str(args.work / "preprocessed"),
                       "AUTOSEG_RESULTS": str(args.work / "results")})
    location = resolve_dataset(args.dataset)
    trained = [r for r in done_runs(args.out) if r["task"] == "real" and r["epochs"] == args.epochs
               and r["iterations"] == args.iterations and r["seed"] == args.seed]
    folders = {r["family"]: location.results / f"3d_fullres__{plans_identifier(r['family'])}" / "fold_0" / "validation"
               for r in trained}
    for first, second in combinations(sorted(folders), 2):
        key = {"task": "pair", "families": [first, second], "dataset": args.dataset, "epochs": args.epochs,
               "iterations": args.iterations, "seed": args.seed}
        if any(all(run.get(k) == v for k, v in key.items()) for run in done_runs(args.out)):
            continue
        output = args.work / "pairs" / f"{first}__{second}"
        api.ensemble([folders[first], folders[second]], output, overwrite=True, workers=2)
        summary = api.evaluate(output, location.raw / "labelsTr", dataset=args.dataset, workers=2)
        with args.out.open("a") as handle:
            handle.write(json.dumps({**key, "validation_dice": summary_dice(to_jsonable(summary)),
                                     "cases": len(summary.cases)}) + "\n")
        print(f"pair {first} + {second}: {summary.foreground_mean:.4f}", flush=True)


def ct_topology():
    """nnU-Net-like abdominal-CT 3d_fullres stage plan: 6 stages, 3x3x3, 32-320 features."""
    from autoseg.model.contract import Topology

    return Topology(dim=3, features_per_stage=(32, 64, 128, 256, 320, 320), kernel_sizes=((3, 3, 3),) * 6,
                    strides=((1, 1, 1),) + ((2, 2, 2),) * 5, convs_per_stage=(2,) * 6,
                    convs_per_decoder_stage=(2,) * 5)


def child_ct(spec: dict) -> dict:
    """One family's sliding-window prediction of the synthetic volume (in a fresh process)."""
    import numpy as np
    import torch

    from autoseg.inference.sliding import WindowSettings, sliding_window_logits, tile_boxes
    from autoseg.model.build import build_network, count_parameters
    from autoseg.model.families import NETWORKS

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    topology = NETWORKS.get(spec["family"]).plan_topology(ct_topology())
    network = build_network(topology, in_channels=1, num_classes=spec["classes"]).eval()
    network.deep_supervision = False
    volume = np.random.default_rng(0).standard_normal((1, *spec["shape"]), dtype=np.float32)
    patch = tuple(spec["patch"])
    settings = WindowSettings(patch=patch, mirror_axes=(0, 1, 2) if spec["tta"] else ())
    with torch.inference_mode():
        network(torch.zeros(1, 1, *patch))  # warm-up, untimed
    started = time.perf_counter()
    logits = sliding_window_logits([network], volume, settings, num_classes=spec["classes"],
                                   device=torch.device("cpu"))
    seconds = time.perf_counter() - started
    peak = next(int(line.split()[1]) / 2**20 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM"))
    return {"seconds": round(seconds, 1), "tiles": len(tile_boxes(volume.shape[1:], patch, settings.step)),
            "parameters": count_parameters(network), "peak_rss_gb": round(peak, 2),
            "foreground_share": round(float((logits.argmax(0) > 0).float().mean()), 4)}


def run_ct(args: argparse.Namespace) -> None:
    for name in args.families or ["enet", "unet"]:
        spec = {"family": name, "shape": args.shape, "patch": [128, 128, 128], "classes": 3, "tta": args.tta,
                "threads": args.threads}
        key = {"task": "ct", **spec}
        if any(all(run.get(k) == v for k, v in key.items()) for run in done_runs(args.out)):
            continue
        print(f"ct: {name} on {args.shape}", flush=True)
        output = subprocess.run([sys.executable, __file__, "_child", json.dumps(spec)], check=True,
                                capture_output=True, text=True).stdout
        with args.out.open("a") as handle:
            handle.write(json.dumps({**key, **json.loads(output.splitlines()[-1]), "cpu": cpu_name()}) + "\n")


def cpu_name() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    extensions = "".join(f" {name}" for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"))
                         if flag in flags)
    return f"{model}{extensions}, {os.cpu_count()} cores"


def table(runs: list[dict]) -> str:
    lines = []
    real = [r for r in runs if r["task"] == "real"]
    if real:
        lines += ["| family | validation Dice per class | parameters | receptive field (voxels) | patch, batch | "
                  "s / iteration | prediction s / case | estimated GPU GiB | measured peak RSS GiB (CPU fp32) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in real:
            dice = " / ".join("-" if d is None else f"{d:.3f}" for d in r["validation_dice"].values())
            lines.append(f"| `{r['family']}` ({r['epochs']} x {r['iterations']} its, seed {r['seed']}) | {dice} | "
                         f"{r['parameters'] / 1e6:.2f} M | {'x'.join(map(str, r['receptive_field']))} | "
                         f"{'x'.join(map(str, r['patch']))}, {r['batch']} | {r['seconds_per_iteration']:.2f} | "
                         f"{r['predict_seconds_per_case']:.2f} | {r['estimated_gb']:.2f} | "
                         f"{r['train_peak_rss_gb']:.2f} |")
    lines += pair_table(runs)
    ct = [r for r in runs if r["task"] == "ct"]
    if ct:
        lines += ["", "| family (CT plan, patch 128^3) | volume | tiles | parameters | seconds | peak RSS GiB |",
                  "|---|---|---|---|---|---|"]
        for r in ct:
            lines.append(f"| `{r['family']}`{' + TTA' if r['tta'] else ''} | {'x'.join(map(str, r['shape']))} | "
                         f"{r['tiles']} | {r['parameters'] / 1e6:.2f} M | {r['seconds']:.1f} | "
                         f"{r['peak_rss_gb']:.2f} |")
    return "\n".join(lines)


def pair_table(runs: list[dict]) -> list[str]:
    """The best pairs (mean foreground Dice) next to the best single family, on the same validation cases."""
    pairs = [r for r in runs if r["task"] == "pair"]
    if not pairs:
        return []

    def mean(run: dict) -> float:
        values = [v for v in run["validation_dice"].values() if v is not None]
        return sum(values) / len(values) if values else float("nan")

    singles = [r for r in runs if r["task"] == "real" and (r["epochs"], r["iterations"], r["seed"]) ==
               (pairs[0]["epochs"], pairs[0]["iterations"], pairs[0]["seed"])]
    best_single = max(singles, key=mean)
    lines = ["", "| setup (fold 0 validation) | Dice per class | mean |", "|---|---|---|"]
    for name, run in [(f"best single: `{best_single['family']}`", best_single)] + \
            [(" + ".join(f"`{f}`" for f in r["families"]), r) for r in sorted(pairs, key=mean, reverse=True)[:5]]:
        dice = " / ".join("-" if d is None else f"{d:.3f}" for d in run["validation_dice"].values())
        lines.append(f"| {name} | {dice} | {mean(run):.4f} |")
    return lines


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_child":
        print(json.dumps(child_ct(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("task", choices=("real", "pairs", "ct", "table"))
    parser.add_argument("--families", nargs="+", help="default: every registered family (real), enet unet (ct)")
    parser.add_argument("--dataset", default="Dataset004_Hippocampus")
    parser.add_argument("--raw", type=Path, default=DEFAULT_RAW)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=250, help="iterations per epoch")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--predict-cases", type=int, default=10)
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 320, 320], help="ct: volume z y x (voxels)")
    parser.add_argument("--tta", action="store_true", help="ct: mirroring TTA (8 passes per tile)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_families"))
    parser.add_argument("--out", type=Path, help="default: WORK/results.jsonl")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out = args.out or args.work / "results.jsonl"
    if args.task == "real":
        run_real(args)
    elif args.task == "pairs":
        run_pairs(args)
    elif args.task == "ct":
        run_ct(args)
    print(table(done_runs(args.out)))


if __name__ == "__main__":
    main()
