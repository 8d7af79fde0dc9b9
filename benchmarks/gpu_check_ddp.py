"""One rank of gpu_check's DDP section, started by torchrun (`python -m torch.distributed.run ...`).

Joins the process group through autoseg's `RuntimeContext.from_env` (NCCL on CUDA, gloo on CPU; with one
process, which autoseg runs without DDP, the check joins a group of one itself) and trains one short
epoch of the prepared dataset with `train_fold`: DDP gradient sync, the all-reduce of the validation
counts, and the check that every rank ends with the same weights. Rank 0 writes a JSON summary to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

from gpu_check_common import Check, data_plan_cases, fold_run
from gpu_check_run import cached_case_ids

from autoseg.runtime.device import configure_threads, seed_all
from autoseg.runtime.distributed import RuntimeContext, _init_process_group, shutdown
from autoseg.serialization import write_json
from autoseg.training.loop import train_fold
from autoseg.training.progress import read_metrics
from autoseg.training.settings import TrainingSettings

ITERATIONS = 4
VALIDATION_CASES = 2


@dataclasses.dataclass(frozen=True)
class OneRankGroup(RuntimeContext):
    """A world of one process run through autoseg's distributed code: process group, DDP wrapper,
    all-reduces and the replica check (autoseg itself skips them all for a single process)."""

    @property
    def distributed(self) -> bool:
        return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    context = RuntimeContext.from_env(args.device)
    if context.world_size == 1:  # autoseg runs one process without DDP; the check wants the DDP path
        _init_process_group(context.device)
        context = OneRankGroup(**{f.name: getattr(context, f.name) for f in dataclasses.fields(context)})
    try:
        configure_threads(context.device)
        seed_all(context.rank)
        check = Check(device=context.device, quick=True, tiny=args.tiny, data=args.data, work=args.work,
                      deadline=math.inf, train_seconds=0.0)
        case = data_plan_cases(check)[0]
        ids = cached_case_ids(args.data / case.config.data_id)
        run = fold_run(case, folder=args.work / "model", cache=args.data / case.config.data_id,
                       train_ids=tuple(ids[VALIDATION_CASES:]), val_ids=tuple(ids[:VALIDATION_CASES]))
        iterations = 2 if args.tiny else ITERATIONS
        settings = TrainingSettings(epochs=1, iterations_per_epoch=iterations, val_iterations=1, workers=0)
        started = time.perf_counter()
        train_fold(run, settings, context)  # raises if the replicas diverged
        if context.is_main:
            record = read_metrics(run.folder.fold_dir(0) / "metrics.jsonl")[-1]
            write_json(args.out, {"backend": "nccl" if context.device.type == "cuda" else "gloo",
                                  "world_size": context.world_size, "device": str(context.device),
                                  "iterations": iterations, "train_loss": record["train_loss"],
                                  "train_seconds": time.perf_counter() - started, "replicas_identical": True,
                                  "group_of_one_forced": isinstance(context, OneRankGroup)})
    finally:
        shutdown(context)


if __name__ == "__main__":
    main()
