"""Seconds per training iteration on CPU for a plan's 3d_fullres network: autoseg with and without the
glibc allocator setting it applies on CPU (`runtime.device.keep_freed_memory`), autoseg with bf16 autocast
(`autoseg train --precision bf16`), and, with --nnunet-python, nnU-Net 2.8.1's own step in fp32 (its
PlainConvUNet and DC_and_CE_loss under DeepSupervisionWrapper, glibc defaults, as nnUNetv2_train runs on a CPU).

Usage: python benchmarks/bench_train_step.py [DATASET_FOLDER] [--iterations N] [--rounds R]
           [--nnunet-python /tmp/nnunet-venv/bin/python]

Plans the dataset (default: the real Hippocampus set), builds its 3d_fullres network and times
forward + deep-supervision loss + backward + gradient clipping (12) + SGD step on random data of the planned
batch and patch (data loading excluded), each variant in a fresh process; rounds alternate the order of the
variants (the best round of each is reported). Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset004_Hippocampus"

PROGRAM = """
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[6])  # the checkout (nnU-Net's venv has autoseg's dependencies, not autoseg)
from autoseg.dataset.load import load_dataset
from autoseg.fingerprint import extract_fingerprint
from autoseg.model.build import build_network
from autoseg.planning import plan
from autoseg.runtime.device import keep_freed_memory
from autoseg.training.loss import DeepSupervisionLoss, DiceCELoss
folder, iterations, tuned, precision, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], sys.argv[5]
dataset = load_dataset(folder)
config = plan(extract_fingerprint(dataset, workers=2), dataset).configurations["3d_fullres"]
if tuned:
    keep_freed_memory()
torch.manual_seed(0)
n_out = config.topology.n_stages - 1
if kind == "nnunet":
    sys.path.insert(0, sys.argv[6] + "/benchmarks")
    from check_nnunet_step import nnunet_network
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from autoseg.training.loss import deep_supervision_weights
    net = nnunet_network(config.topology, len(dataset.channel_names), dataset.num_classes)
    loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
                                                 {}, weight_ce=1, weight_dice=1, ignore_label=None,
                                                 dice_class=MemoryEfficientSoftDiceLoss),
                                  deep_supervision_weights(n_out))
else:
    net = build_network(config.topology, in_channels=len(dataset.channel_names), num_classes=dataset.num_classes)
    loss = DeepSupervisionLoss(DiceCELoss(), n_out)
opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
x = torch.randn(config.batch_size, len(dataset.channel_names), *config.patch_size)
sizes, targets = list(config.patch_size), []
for stride in config.topology.strides[:n_out]:
    sizes = [s // k for s, k in zip(sizes, stride)]
    targets.append(torch.randint(0, dataset.num_classes, (config.batch_size, 1, *sizes)))
def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = net(x)
        value = loss(out, targets)
    value.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0); opt.step()
step()
before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(iterations):
    step()
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": (time.perf_counter() - t0) / iterations,
                  "system": (after.ru_stime - before.ru_stime) / iterations,
                  "faults": (after.ru_minflt - before.ru_minflt) / iterations,
                  "patch": list(config.patch_size), "batch": config.batch_size,
                  "threads": torch.get_num_threads()}))
"""


#: name -> (interpreter: "autoseg" or "nnunet", keep freed memory, precision)
VARIANTS = {"glibc default": ("autoseg", "0", "fp32"), "autoseg (keep freed memory)": ("autoseg", "1", "fp32"),
            "autoseg bf16 autocast": ("autoseg", "1", "bf16"), "nnU-Net 2.8.1 fp32": ("nnunet", "0", "fp32")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--nnunet-python", type=Path, default=None, help="python of a venv with nnunetv2 2.8.1")
    args = parser.parse_args()
    checkout = str(Path(__file__).resolve().parents[1])
    variants = {name: v for name, v in VARIANTS.items() if v[0] == "autoseg" or args.nnunet_python}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name in list(variants) if round_index % 2 == 0 else reversed(list(variants)):
            kind, tuned, precision = variants[name]
            python = str(args.nnunet_python) if kind == "nnunet" else sys.executable
            out = subprocess.run([python, "-c", PROGRAM, str(args.dataset), str(args.iterations), tuned, precision,
                                  kind, checkout], capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    rows = {name: {**min(done, key=lambda run: run["seconds"]), "runs": [round(run["seconds"], 2) for run in done]}
            for name, done in runs.items()}
    first = next(iter(rows.values()))
    print(f"3d_fullres patch {first['patch']}, batch {first['batch']}, {first['threads']} torch threads, "
          f"{args.iterations} iterations per run, {args.rounds} round(s)\n")
    print("| variant | s per iteration (best; all runs) | system s per iteration | page faults per iteration |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['seconds']:.2f} ({', '.join(map(str, row['runs']))}) | {row['system']:.2f} | "
              f"{row['faults']:.0f} |")
    base, tuned_row = rows["glibc default"], rows["autoseg (keep freed memory)"]
    print(f"\nallocator speed-up: {base['seconds'] / tuned_row['seconds']:.2f}x")
    if "nnU-Net 2.8.1 fp32" in rows:
        reference = rows["nnU-Net 2.8.1 fp32"]["seconds"]
        for name in ("autoseg (keep freed memory)", "autoseg bf16 autocast"):
            print(f"{name} vs nnU-Net's fp32 step: {reference / rows[name]['seconds']:.2f}x")


if __name__ == "__main__":
    main()
