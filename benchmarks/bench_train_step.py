"""Seconds per training iteration on CPU for a plan's 3d_fullres network, with and without the
glibc allocator setting that autoseg applies on CPU (`runtime.device.keep_freed_memory`).

Usage: python benchmarks/bench_train_step.py [DATASET_FOLDER] [--iterations N]

Plans the dataset (default: the real Hippocampus set), builds its 3d_fullres network and times
forward + deep-supervision loss + backward + SGD step on random data of the planned batch and patch
(data loading excluded), each variant in a fresh process, one after the other. Prints Markdown.
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
from autoseg.dataset.load import load_dataset
from autoseg.fingerprint import extract_fingerprint
from autoseg.model.build import build_network
from autoseg.planning import plan
from autoseg.runtime.device import keep_freed_memory
from autoseg.training.loss import DeepSupervisionLoss, DiceCELoss
folder, iterations, tuned = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
dataset = load_dataset(folder)
config = plan(extract_fingerprint(dataset, workers=2), dataset).configurations["3d_fullres"]
if tuned:
    keep_freed_memory()
torch.manual_seed(0)
net = build_network(config.topology, in_channels=len(dataset.channel_names), num_classes=dataset.num_classes)
opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
n_out = config.topology.n_stages - 1
loss = DeepSupervisionLoss(DiceCELoss(), n_out)
x = torch.randn(config.batch_size, len(dataset.channel_names), *config.patch_size)
sizes, targets = list(config.patch_size), []
for stride in config.topology.strides[:n_out]:
    sizes = [s // k for s, k in zip(sizes, stride)]
    targets.append(torch.randint(0, dataset.num_classes, (config.batch_size, 1, *sizes)))
def step():
    opt.zero_grad(); out = net(x); value = loss(out, targets); value.backward(); opt.step()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()
    rows = {}
    for name, tuned in (("glibc default", "0"), ("autoseg (keep freed memory)", "1")):
        out = subprocess.run([sys.executable, "-c", PROGRAM, str(args.dataset), str(args.iterations), tuned],
                             capture_output=True, text=True, check=True).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
    first = next(iter(rows.values()))
    print(f"3d_fullres patch {first['patch']}, batch {first['batch']}, {first['threads']} torch threads, "
          f"{args.iterations} iterations\n")
    print("| allocator | s per iteration | system s per iteration | page faults per iteration |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['seconds']:.2f} | {row['system']:.2f} | {row['faults']:.0f} |")
    base, tuned_row = rows["glibc default"], rows["autoseg (keep freed memory)"]
    print(f"\nspeed-up: {base['seconds'] / tuned_row['seconds']:.2f}x")


if __name__ == "__main__":
    main()
