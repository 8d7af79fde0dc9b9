"""How close the CPU forward pass runs to the hardware: FLOPs of one call, seconds, GFLOP/s, per precision.

Why: with mirroring TTA the forward passes are nearly all of `autoseg predict`'s time, and nnU-Net runs the
very same convolutions. If torch's fp32 pass already runs near the CPU's fp32 peak, no engine can make it much
faster with the same arithmetic; only fewer bits per operation (bf16) or fewer operations can (issue 17's
torch fp32 ratio). The FLOPs are counted by torch's FlopCounterMode on the meta device (multiply and add
counted as 2), for the planned 3d_fullres network of the given plans file with random weights, at the plan's
patch and --batch tiles per call (8 = the mirrored copies of one tile, autoseg's CPU default for small
patches). Each precision runs --repeats timed calls after one untimed call; the best is reported.

    python benchmarks/bench_forward_rate.py --plans /tmp/bf/preprocessed/Dataset004_Hippocampus/plans.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from bench_families import cpu_name
from torch.utils.flop_counter import FlopCounterMode


def network_and_input(plans_file: Path, configuration: str, batch: int, device: str) -> tuple[torch.nn.Module,
                                                                                               torch.Tensor]:
    """The plan's network (eval, single output) and a random batch (batch, channels, *patch), on `device`."""
    from autoseg.model.build import build_network
    from autoseg.planning.contract import Plans
    from autoseg.serialization import load_contract

    plans = load_contract(plans_file, Plans, rerun="autoseg plan")
    config = plans.configurations[configuration]
    channels = len(plans.channel_names)
    torch.manual_seed(0)
    with torch.device(device):
        network = build_network(config.topology, in_channels=channels, num_classes=3).eval()
        network.deep_supervision = False
        return network, torch.randn(batch, channels, *config.patch_size)


def counted_flops(plans_file: Path, configuration: str, batch: int) -> int:
    network, x = network_and_input(plans_file, configuration, batch, "meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network(x)
    return counter.get_total_flops()


def best_seconds(network: torch.nn.Module, x: torch.Tensor, precision: str, repeats: int) -> float:
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    times = []
    with torch.inference_mode(), autocast:
        network(x)
        for _ in range(repeats):
            start = time.perf_counter()
            network(x)
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", type=Path, required=True)
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flops = counted_flops(args.plans, args.configuration, args.batch)
    network, x = network_and_input(args.plans, args.configuration, args.batch, "cpu")
    for precision in args.precisions:
        seconds = best_seconds(network, x, precision, args.repeats)
        print(json.dumps({"precision": precision, "batch": args.batch, "patch": list(x.shape[2:]),
                          "gflop_per_call": round(flops / 1e9, 1), "seconds": round(seconds, 3),
                          "gflop_per_s": round(flops / 1e9 / seconds, 1), "threads": args.threads,
                          "cpu": cpu_name()}), flush=True)


if __name__ == "__main__":
    main()
