"""The GPU check (issue 13): autoseg's CUDA path checked and timed in one run, one JSON and one Markdown table.

Usage:
    python benchmarks/gpu_check.py [--device cuda|cpu] [--quick] [--data PREPROCESSED_DATASET]
                                   [--work DIR] [--json FILE] [--markdown FILE] [--sections a,b,...]
                                   [--time-limit S] [--train-seconds S] [--tiny] [--verbose]

Sections, in the order they run (each catches its own failures and records "failed: <reason>", and
every row within a section does too, so one failure never loses the other figures):
  environment     versions, GPU, CPUs, the CUDA context's size
  train_steps     one training step on a synthetic batch, the dataset's 3d_fullres plan and a large-CT-like
                  plan: fp32, bf16, fp16 + GradScaler, channels-last, cudnn.benchmark, torch.compile
  memory          the planner's estimate vs torch.cuda.max_memory_allocated for Hippocampus, synthetic CT
                  and large synthetic CT plans; whether the 8 GiB plans train inside 8 GiB
  loader          batches/s of autoseg's loader per worker count vs the GPU's it/s: workers needed
  physical_limit  convolution FLOPs of a step over the measured rate, against the measured step time
  ddp             autoseg's training loop under torchrun: 1 process (NCCL), 2 processes on one GPU
  training        a short real training (fold 0, real epochs until --train-seconds): it/s, pseudo-Dice
  prediction      GPU vs forced CPU accumulation (equal outputs, s/case, TTA on/off), mixed precision vs
                  CPU fp32 argmax agreement, a CT-sized volume

--data is a preprocessed dataset folder (plans.json, dataset.json, the 3d_fullres cache), e.g. what
benchmarks/gpu_prepare.sh packs for the GPU machine. Without it the synthetic example dataset is made,
planned and preprocessed in the work folder (this needs SimpleITK, so not on the GPU machine).
`--device cpu --quick` shrinks every network (--tiny) and runs in seconds: the CI run of this script.
docs/gpu-check.md has the recipe for the GPU machine and the table's format.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gpu_check_common import Check, failure, release_memory
from gpu_check_predict import prediction
from gpu_check_run import ddp, environment, loader, training
from gpu_check_steps import memory, physical_limit, train_steps

RESULT_FORMAT = 1
SECTIONS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "environment": environment, "train_steps": train_steps, "memory": memory, "loader": loader,
    "physical_limit": physical_limit, "ddp": ddp, "training": training, "prediction": prediction,
}
#: Seconds a section needs left before the deadline to start at all.
MIN_SECONDS = {"training": 20.0}
DEFAULT_WORK = Path("autoseg_data") / "gpu_check"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--quick", action="store_true", help="the 1-minute subset (seconds on CPU)")
    parser.add_argument("--data", type=Path, help="preprocessed dataset folder (default: make the example)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"scratch folder (default {DEFAULT_WORK})")
    parser.add_argument("--json", type=Path, help="result file (default WORK/gpu_check.json)")
    parser.add_argument("--markdown", type=Path, help="table file (default WORK/gpu_check.md)")
    parser.add_argument("--sections", help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    parser.add_argument("--time-limit", type=float, help="seconds after which sections are skipped "
                        "(default 450, quick 120)")
    parser.add_argument("--train-seconds", type=float, help="budget of the training section (default 240, quick 20)")
    parser.add_argument("--tiny", action="store_true", help="shrink every network (implied by --device cpu --quick)")
    parser.add_argument("--verbose", action="store_true", help="autoseg's INFO log lines")
    args = parser.parse_args(argv)
    chosen = args.sections.split(",") if args.sections else list(SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    args.sections = [name for name in SECTIONS if name in chosen]
    return args


def example_data(work: Path) -> Path:
    """The synthetic example dataset (4 CT cases of about 32^3 voxels), planned and preprocessed for
    3d_fullres under `work`; reused when already there."""
    from autoseg.dataset.load import load_dataset
    from autoseg.dataset.synthetic import make_example_dataset
    from autoseg.fingerprint import extract_fingerprint
    from autoseg.planning import plan
    from autoseg.preprocessing.run import preprocess_dataset
    from autoseg.serialization import save_contract

    out = work / "preprocessed" / "Dataset900_Example"
    if (out / "plans.json").is_file():
        return out
    raw = make_example_dataset(work / "raw" / "Dataset900_Example", n_cases=4, size=32, overwrite=True)
    dataset = load_dataset(raw)
    plans = plan(extract_fingerprint(dataset), dataset)
    preprocess_dataset(dataset, plans, ["3d_fullres"], out_root=out)
    shutil.copyfile(raw / "dataset.json", out / "dataset.json")
    save_contract(out / "plans.json", plans)
    return out


def run_section(check: Check, name: str) -> dict[str, Any]:
    """One section's result: status ok / partial (some rows failed) / failed / skipped, rows, seconds."""
    needed = MIN_SECONDS.get(name, 5.0)
    if check.remaining() < needed:
        return {"status": "skipped", "reason": f"skipped: {check.remaining():.0f} s left of the time limit",
                "rows": [], "seconds": 0.0}
    started = time.perf_counter()
    try:
        result = SECTIONS[name](check)
        errors = [r for r in result.get("rows", []) if "error" in r]
        status = "ok" if not errors else "failed" if len(errors) == len(result["rows"]) else "partial"
        result.update(status=status, reason=errors[0]["error"] if errors else None)
    except Exception as err:  # a section's failure is a result, never the end of the check
        result = {"status": "failed", "reason": failure(err), "rows": [],
                  "traceback": traceback.format_exc(limit=6)[-3000:]}
    finally:
        release_memory()
    result["seconds"] = time.perf_counter() - started
    return result


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(result: dict[str, Any]) -> str:
    """The one table: a row per result row, a row per failed or skipped section."""
    lines = [f"GPU check of autoseg: {result['device_name']} ({result['device']}), torch {result['torch']}, "
             f"{'quick' if result['quick'] else 'full'} run{' (tiny networks)' if result['tiny'] else ''}, "
             f"started {result['started']}, {result.get('seconds', 0):.0f} s.", "",
             "| section | what | figure | detail |", "|---|---|---|---|"]
    for name, section in result["sections"].items():
        if section["status"] in ("failed", "skipped") and not section["rows"]:
            lines.append(f"| {name} | ({section['seconds']:.0f} s) | {_cell(section['reason'])} | |")
        for item in section["rows"]:
            figure = item.get("error") or item.get("figure", "")
            lines.append(f"| {name} | {_cell(item['what'])} | {_cell(figure)} | {_cell(item.get('detail', ''))} |")
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    """Plain JSON: paths and dtypes as text, NaN and infinities as null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def write_outputs(result: dict[str, Any], json_path: Path, markdown_path: Path) -> None:
    """Both files, rewritten after every section so a killed run keeps what it measured."""
    for path, text in ((json_path, json.dumps(_jsonable(result), indent=1)), (markdown_path, markdown(result))):
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        partial.replace(path)


def _device_name(device: Any) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


@contextmanager
def quiet_process(verbose: bool, threads: int | None) -> Iterator[None]:
    """autoseg's log at WARNING (INFO with --verbose) and, for --tiny on CPU, one torch thread (a shared
    CI machine with busy cores makes OpenMP spin 50x slower); both restored afterwards."""
    import torch

    from autoseg.log import configure

    logger = logging.getLogger("autoseg")
    saved = (logger.level, list(logger.handlers), logger.propagate, torch.get_num_threads())
    configure(1 if verbose else 0)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        logger.setLevel(saved[0])
        logger.handlers[:] = saved[1]
        logger.propagate = saved[2]
        torch.set_num_threads(saved[3])


def make_check(args: argparse.Namespace, device: Any) -> Check:
    quick, work = args.quick, args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    return Check(device=device, quick=quick, tiny=args.tiny or (quick and device.type == "cpu"),
                 data=(args.data or example_data(work)).resolve(), work=work,
                 deadline=time.perf_counter() + (args.time_limit or (120.0 if quick else 450.0)),
                 train_seconds=args.train_seconds or (20.0 if quick else 240.0))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from autoseg.runtime.device import pick_device

    device = pick_device(args.device)
    tiny_cpu = device.type == "cpu" and (args.tiny or args.quick)
    with quiet_process(args.verbose, 1 if tiny_cpu else None):
        started = time.perf_counter()
        check = make_check(args, device)
        result: dict[str, Any] = {
            "format": RESULT_FORMAT, "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else argv, "device": str(device),
            "device_name": _device_name(device), "torch": torch.__version__, "quick": check.quick,
            "tiny": check.tiny, "data": str(check.data), "sections": {}}
        json_path = args.json or check.work / "gpu_check.json"
        markdown_path = args.markdown or check.work / "gpu_check.md"
        for name in args.sections:
            print(f"gpu_check: {name} ...", flush=True)
            section = run_section(check, name)
            result["sections"][name] = section
            result["seconds"] = time.perf_counter() - started
            print(f"gpu_check: {name} {section['status']} in {section['seconds']:.1f} s"
                  + (f" ({section['reason']})" if section["reason"] else ""), flush=True)
            write_outputs(result, json_path, markdown_path)
    print(markdown(result), flush=True)
    print(f"gpu_check: wrote {json_path} and {markdown_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
