"""Does every class get learnt early, for every seed? Multi-seed study of training settings (issue 12).

Two protocols:

saved   the saved-batch protocol: N batches drawn once by autoseg's loader from fold 0's training cases
        (no augmentation) and stored, then for every (variant, seed) a fresh network (torch seed = the
        seed, the He draws of `autoseg train --seed`) takes one SGD step per stored batch with autoseg's
        loss and optimiser (lr 0.01, momentum 0.99, Nesterov, weight decay 3e-5, clipping 12). Every
        --eval-every iterations the network predicts fixed batches of fold 0's validation cases
        (no augmentation); Dice per class of the argmax, pooled over those patches.
real    `autoseg train DATASET 3d_fullres 0 --epochs 1 --iterations-per-epoch 250` per (variant, seed),
        each in its own results folder, then the final validation's Dice per class (full cases,
        sliding window, TTA) from fold_0/validation/summary.json and the pseudo-Dice from metrics.jsonl.

A variant is a name or NAME=field:value,field:value over TrainingSettings fields, e.g.
`old=init:nnunet`, `prior=init:prior`, `warm=init:nnunet,warmup_iterations:50`. Results are appended
to --out as one JSON line per run (a rerun skips what is there); the Markdown table is printed at the end.

    python benchmarks/bench_learning.py saved --variants old=init:nnunet new=init:prior --seeds 0-9
    python benchmarks/bench_learning.py real --variants new=init:prior --seeds 12345 1 2
    python benchmarks/bench_learning.py table --out FILE      # only print the table of stored results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

DEFAULT_RAW = Path(__file__).resolve().parents[2] / "shared" / "data"
PASS_DICE, TARGET_DICE = 0.5, 0.75
#: The real protocol's budget for result lines written before epochs/iterations were recorded.
REAL_BUDGET = {"epochs": 1, "iterations": 250}


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    """'name=field:value,...' -> (name, overrides); a bare name has no overrides (the defaults).

    Values are JSON where they parse (50, true, null), else strings (prior, nnunet).
    """
    name, _, spec = text.partition("=")
    overrides: dict[str, object] = {}
    for item in filter(None, spec.split(",")):
        key, _, raw = item.partition(":")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return name, overrides


#: TrainingSettings field -> `autoseg train` flag, for the real protocol.
FLAGS = {"init": "--init", "warmup_iterations": "--warmup", "initial_lr": "--lr", "seed": "--seed",
         "augmentation": "--augmentation"}


def cli_flags(variant: dict[str, object]) -> list[str]:
    """The `autoseg train` flags that set a variant's overrides."""
    flags: list[str] = []
    for key, value in variant.items():
        if key == "batch_dice":
            flags.append("--batch-dice" if value else "--sample-dice")
        elif key in FLAGS:
            flags += [FLAGS[key], str(value)]
        else:
            raise SystemExit(f"the real protocol has no flag for {key!r}; known: batch_dice, {', '.join(FLAGS)}")
    return flags


def parse_seeds(items: list[str]) -> list[int]:
    seeds: list[int] = []
    for item in items:
        low, _, high = item.partition("-")
        seeds += list(range(int(low), int(high) + 1)) if high else [int(low)]
    return seeds


def done_runs(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.is_file() else []


def prepare(args: argparse.Namespace) -> tuple[object, object, Path, list[str], list[str]]:
    """Plan and preprocess the dataset into --work (skipped when done); (plans, config, cache, train, val)."""
    from autoseg import api
    from autoseg.paths import resolve_dataset
    from autoseg.training.splits import fold_cases, load_or_create_splits

    os.environ.setdefault("AUTOSEG_RAW", str(args.raw))
    os.environ["AUTOSEG_PREPROCESSED"] = str(args.work / "preprocessed")
    os.environ["AUTOSEG_RESULTS"] = str(args.work / "results")
    plans = api.plan(args.dataset)
    api.preprocess(args.dataset, configurations=(args.configuration,))
    location = resolve_dataset(args.dataset)
    config = plans.configurations[args.configuration]
    ids = sorted(p.stem for p in (location.preprocessed / config.data_id).glob("*.json"))
    train, val = fold_cases(load_or_create_splits(location.preprocessed, ids, extra=[location.raw]), 0, ids)
    return plans, config, location.preprocessed / config.data_id, train, val


def stored_batches(path: Path, cache: Path, ids: list[str], config, *, count: int, seed: int,
                   deep_supervision: bool) -> list[dict]:
    """`count` un-augmented batches of autoseg's loader, saved once to `path` (npz) and reused."""
    from autoseg.training.data import make_loader

    if not path.is_file():
        batches = []
        with make_loader(cache, ids, config, augmentation="none", workers=0, seed=seed,
                         deep_supervision=deep_supervision) as loader:
            for _, batch in zip(range(count), loader):
                batches.append(batch)
        arrays = {f"data{i}": b["data"] for i, b in enumerate(batches)}
        arrays.update({f"target{i}_{k}": t for i, b in enumerate(batches) for k, t in enumerate(b["target"])})
        np.savez(path.with_suffix(".tmp.npz"), **arrays)
        path.with_suffix(".tmp.npz").replace(path)
    stored = np.load(path)
    out = []
    for i in range(count):
        targets = sorted((k for k in stored.files if k.startswith(f"target{i}_")), key=lambda k: int(k.split("_")[1]))
        out.append({"data": stored[f"data{i}"], "target": [stored[k] for k in targets]})
    return out


def saved_run(args, plans, config, cache: Path, train_ids: list[str], batches: list[dict], evals: list[dict], *,
              variant: dict[str, object], seed: int) -> dict:
    """One (variant, seed) run of the saved-batch protocol; Dice per class every --eval-every steps."""
    import torch

    from autoseg.model.build import build_network
    from autoseg.training.init import initialise_outputs
    from autoseg.training.loss import DeepSupervisionLoss, DiceCELoss
    from autoseg.training.settings import TrainingSettings, warmup_factor
    from autoseg.training.steps import dice_from_counts, train_step, validation_step

    settings = replace(TrainingSettings(seed=seed), **variant).validated()
    amp = torch.bfloat16 if args.precision == "bf16" else None
    torch.manual_seed(seed)
    net = build_network(config.topology, in_channels=len(plans.channel_names), num_classes=plans.num_classes)
    initialise_outputs(net, settings.init, cache=cache, case_ids=train_ids, config=config,
                       num_classes=plans.num_classes, batch_size=config.batch_size,
                       oversample=settings.foreground_oversample, seed=seed)
    batch_dice = config.batch_dice if settings.batch_dice is None else settings.batch_dice
    loss = DeepSupervisionLoss(DiceCELoss(batch_dice=batch_dice), config.topology.n_stages - 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=settings.initial_lr, momentum=settings.momentum, nesterov=True,
                                weight_decay=settings.weight_decay)
    curve, losses, started = [], [], time.perf_counter()
    for i, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = settings.initial_lr * warmup_factor(i, settings.warmup_iterations)
        net.train()
        tensors = (torch.from_numpy(batch["data"]), [torch.from_numpy(t).long() for t in batch["target"]])
        losses.append(train_step(net, optimizer, loss, tensors, scaler=torch.amp.GradScaler("cpu", enabled=False),
                                 amp_dtype=amp, grad_clip=settings.grad_clip))
        if (i + 1) % args.eval_every == 0 or i + 1 == len(batches):
            net.eval()
            counts = sum(validation_step(net, loss, (torch.from_numpy(b["data"]),
                                                     [torch.from_numpy(t).long() for t in b["target"]]),
                                         amp_dtype=amp, regions=None, num_classes=plans.num_classes)[1] for b in evals)
            curve.append([i + 1, *[round(float(d), 4) for d in dice_from_counts(counts)]])
            print(f"  {i + 1:4d}: loss {np.mean(losses[-args.eval_every:]):.4f} Dice "
                  f"{' / '.join(f'{d:.3f}' for d in curve[-1][1:])}", flush=True)
    return {"curve": curve, "seconds": round(time.perf_counter() - started, 1), "losses": [round(x, 5) for x in losses]}


def run_saved(args: argparse.Namespace) -> None:
    import torch

    from autoseg.runtime.device import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    plans, config, cache, train_ids, val_ids = prepare(args)
    batches = stored_batches(args.work / f"train_batches_{args.iterations}.npz", cache, train_ids, config,
                             count=args.iterations, seed=args.batch_seed, deep_supervision=True)
    evals = stored_batches(args.work / f"eval_batches_{args.eval_batches}.npz", cache, val_ids, config,
                           count=args.eval_batches, seed=args.batch_seed + 1, deep_supervision=True)
    for text in args.variants:
        name, variant = parse_variant(text)
        for seed in parse_seeds(args.seeds):
            key = {"protocol": "saved", "variant": name, "overrides": variant, "seed": seed,
                   "precision": args.precision, "iterations": args.iterations, "dataset": str(args.dataset)}
            if any(all(r.get(k) == v for k, v in key.items()) for r in done_runs(args.out)):
                continue
            print(f"{name} seed {seed}", flush=True)
            result = {**key, **saved_run(args, plans, config, cache, train_ids, batches, evals, variant=variant,
                                         seed=seed)}
            with args.out.open("a") as f:
                f.write(json.dumps(result) + "\n")


def run_real(args: argparse.Namespace) -> None:
    """One `autoseg train` per (variant, seed) in its own results folder; reads validation and metrics."""
    prepare(args)
    for text in args.variants:
        name, variant = parse_variant(text)
        for seed in parse_seeds(args.seeds):
            iterations = args.iterations or 250
            key = {"protocol": "real", "variant": name, "overrides": variant, "seed": seed,
                   "dataset": str(args.dataset), "epochs": args.epochs, "iterations": iterations}
            if any(all(r.get(k, REAL_BUDGET.get(k)) == v for k, v in key.items()) for r in done_runs(args.out)):
                continue
            budget = "" if (args.epochs, iterations) == (1, 250) else f"_{args.epochs}x{iterations}"
            results = args.work / f"results_{name}_{seed}{budget}"
            flags = cli_flags(variant)
            command = [sys.executable, "-m", "autoseg", "train", str(args.dataset), args.configuration, "0",
                       "--epochs", str(args.epochs), "--iterations-per-epoch", str(iterations),
                       "--seed", str(seed), *flags]
            print(" ".join(command), flush=True)
            started = time.perf_counter()
            subprocess.run(command, check=True, env={**os.environ, "AUTOSEG_RESULTS": str(results)})
            fold = next(results.glob(f"*/{args.configuration}__*/fold_0"))
            summary = json.loads((fold / "validation" / "summary.json").read_text())
            metrics = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
            result = {**key, "seconds": round(time.perf_counter() - started, 1), "command": " ".join(command[2:]),
                      "validation_dice": summary_dice(summary), "pseudo_dice": metrics[-1]["pseudo_dice"],
                      "metrics": metrics}
            with args.out.open("a") as f:
                f.write(json.dumps(result) + "\n")


def summary_dice(summary: dict) -> dict[str, float | None]:
    """Mean Dice per label name from an autoseg evaluation summary.json."""
    return {name: (None if m["dice"] is None else round(float(m["dice"]), 4)) for name, m in summary["mean"].items()}


def first_pass(curve: list[list[float]], column: int, threshold: float = PASS_DICE) -> str:
    return next((str(int(row[0])) for row in curve if row[column] == row[column] and row[column] >= threshold), "never")


def table(runs: list[dict], at: int = 100) -> str:
    lines = []
    saved = [r for r in runs if r["protocol"] == "saved"]
    for name in dict.fromkeys(r["variant"] for r in saved):
        rows = [r for r in saved if r["variant"] == name]
        n_classes = len(rows[0]["curve"][0]) - 1
        ok = 0
        first = rows[0]
        lines += [f"\n**{name}** `{first['overrides']}` ({first['precision']}, {first['iterations']} iterations)\n",
                  "| seed | " + " | ".join(f"class {c + 1}: first Dice >= 0.5 at" for c in range(n_classes))
                  + f" | Dice at {at} | Dice at the end | s |", "|---" * (n_classes + 4) + "|"]
        for r in sorted(rows, key=lambda r: r["seed"]):
            at_row = next((row for row in r["curve"] if row[0] == at), r["curve"][-1])
            ok += all(d >= TARGET_DICE for d in at_row[1:])
            lines.append(f"| {r['seed']} | " + " | ".join(first_pass(r["curve"], c + 1) for c in range(n_classes))
                         + f" | {' / '.join(f'{d:.3f}' for d in at_row[1:])} | "
                         f"{' / '.join(f'{d:.3f}' for d in r['curve'][-1][1:])} | {r['seconds']:.0f} |")
        lines.append(f"\nevery class >= {TARGET_DICE} at iteration {at}: **{ok} of {len(rows)} seeds**")
    real = [r for r in runs if r["protocol"] == "real"]
    if real:
        lines += ["\n| variant | seed | epochs x iterations | pseudo-Dice | validation Dice | s |",
                  "|---|---|---|---|---|---|"]
        for r in real:
            budget = {k: r.get(k, v) for k, v in REAL_BUDGET.items()}
            pseudo = " / ".join(f"{v:.3f}" for v in r["pseudo_dice"].values() if v is not None)
            validation = " / ".join(f"{v:.3f}" for v in r["validation_dice"].values() if v is not None)
            lines.append(f"| {r['variant']} `{r['overrides']}` | {r['seed']} | {budget['epochs']} x "
                         f"{budget['iterations']} | {pseudo} | {validation} | "
                         f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol", choices=("saved", "real", "table"))
    parser.add_argument("--dataset", default="Dataset004_Hippocampus")
    parser.add_argument("--raw", type=Path, default=DEFAULT_RAW)
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--variants", nargs="+", default=["default"])
    parser.add_argument("--seeds", nargs="+", default=["0-9"])
    parser.add_argument("--iterations", type=int, default=None, help="saved: 100 batches; real: 250 per epoch")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--batch-seed", type=int, default=2026)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="saved: autocast dtype of the forward pass on CPU (bf16 needs a CPU with native bf16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("bench_learning_work"))
    parser.add_argument("--out", type=Path, default=None, help="JSONL results (default: WORK/results.jsonl)")
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out = args.out or args.work / "results.jsonl"
    if args.iterations is None:
        args.iterations = 100 if args.protocol == "saved" else 250
    if args.protocol == "saved":
        run_saved(args)
    elif args.protocol == "real":
        run_real(args)
    print(table(done_runs(args.out)))


if __name__ == "__main__":
    main()
