"""Benchmark autoseg's training loader against a plain batchgenerators pipeline, in one run.

Usage:
    python benchmarks/bench_loader.py [--data FOLDER] [--configuration 3d_fullres] [--workers 2]
                                      [--batches N] [--rounds N] [--markdown FILE]

The real Hippocampus dataset is planned and preprocessed into a temporary folder (or --preprocessed),
then each pipeline makes --batches batches after a warm-up of 2 batches per worker (worker start-up
excluded), for --rounds rounds in alternating order; the best and median rate are reported.

Pipelines (same patch, batch size, enlarged patch, transforms and probabilities):
  baseline   an nnU-Net-v1-like batchgenerators DataLoader: per sample the whole case is loaded with
             np.load (no memory map) with its properties and all class locations, the enlarged patch is
             cropped and padded for every sample, then a batchgenerators Compose (SpatialTransform with
             p_rot 0.2 / p_scale 0.2, the intensity transforms, mirroring, RemoveLabel, deep-supervision
             targets with batchgenerators' resize_segmentation order 0) in MultiThreadedAugmenter.
  autoseg    make_loader: memory-mapped box reads, the enlarged box only for the samples that are
             rotated or scaled, spatial step per sample, strided deep-supervision targets, own workers.
  autoseg in MTA   autoseg's batch maker in batchgenerators' MultiThreadedAugmenter (isolates the workers).
CPU ms per batch sums user + system time of the workers and the main process over the timed
batches: unlike batches/s it does not move when a shared machine steals CPU time. Peak RSS is the
largest VmHWM over the worker processes (it includes pages shared with the parent after fork).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset004_Hippocampus"


def prepare(data: Path, out: Path, configuration: str) -> tuple[Path, list[str], Any]:
    """Plan and preprocess `data` under `out`; returns (cache folder, case ids, Configuration)."""
    os.environ["AUTOSEG_PREPROCESSED"] = str(out / "preprocessed")
    os.environ.setdefault("AUTOSEG_RAW", str(data.parent))
    from autoseg import api
    from autoseg.dataset.load import load_dataset
    from autoseg.preprocessing.run import preprocess_dataset

    plans = api.plan(data)
    folders = preprocess_dataset(load_dataset(data), plans, [configuration], out_root=out / "cache", workers=2)
    folder = folders[configuration]
    ids = sorted(p.name[: -len(".json")] for p in folder.glob("*.json"))
    return folder, ids, plans.configurations[configuration]


# ---------------------------------------------------------------- the baseline


class PlainLoader:
    """nnU-Net-v1-like batchgenerators data loader: whole cases, enlarged crop for every sample."""

    def __init__(self, folder: Path, ids: list[str], patch: tuple[int, ...], size: tuple[int, ...],
                 batch_size: int, oversample: float = 0.33) -> None:
        self.folder, self.ids, self.patch, self.size = folder, ids, patch, size
        self.batch_size, self.oversample, self.thread_id = batch_size, oversample, 0

    def set_thread_id(self, thread_id: int) -> None:
        self.thread_id = thread_id

    def __iter__(self) -> PlainLoader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        from autoseg.training.sampling import crop_padded

        data, seg = [], []
        n_forced = int(np.floor(self.oversample * self.batch_size + 0.5))
        for j, case in enumerate(np.random.choice(len(self.ids), self.batch_size)):
            case_id = self.ids[case]
            image = np.load(self.folder / f"{case_id}.npy")
            label = np.load(self.folder / f"{case_id}_seg.npy")
            properties = json.loads((self.folder / f"{case_id}.json").read_text())
            with np.load(self.folder / f"{case_id}_locations.npz") as stored:
                locations = {int(k): stored[k] for k in stored.files}
            lower = self._lower(label.shape, properties, locations, forced=j >= self.batch_size - n_forced)
            two_d = len(self.patch) == 2
            if two_d:
                image, label, lower = image[:, lower[0]], label[lower[0]], lower[1:]
            lower = [low - (s - p) // 2 for low, s, p in zip(lower, self.size, self.patch)]
            data.append(crop_padded(image, lower, self.size, fill=0.0))
            seg.append(crop_padded(label, lower, self.size, fill=-1)[None].astype(np.float32))
        return {"data": np.stack(data), "seg": np.stack(seg)}

    def _lower(self, shape: tuple[int, ...], properties: dict, locations: dict, *, forced: bool) -> list[int]:
        two_d = len(self.patch) == 2
        classes = [c for c in properties["classes"] if len(locations.get(c, ()))]
        spatial = shape[1:] if two_d else shape
        if forced and classes:
            points = locations[classes[np.random.randint(len(classes))]]
            voxel = points[np.random.randint(len(points))]
            centre = voxel[1:] if two_d else voxel
            lower = [int(np.clip(c - p // 2, min(0, n - p), max(0, n - p)))
                     for c, p, n in zip(centre, self.patch, spatial)]
            return [int(voxel[0]), *lower] if two_d else lower
        lower = [np.random.randint(min(0, n - p), max(0, n - p) + 1) for p, n in zip(self.patch, spatial)]
        return [np.random.randint(shape[0]), *lower] if two_d else lower


class PlainTargets:
    """-1 -> 0 and deep-supervision targets with batchgenerators' resize_segmentation (order 0)."""

    def __init__(self, factors: list[tuple[int, ...]]) -> None:
        self.factors = factors

    def __call__(self, **batch: Any) -> dict[str, Any]:
        from batchgenerators.augmentations.utils import resize_segmentation

        seg = batch["seg"]
        seg[seg < 0] = 0
        targets = []
        for factor in self.factors:
            shape = [n // f for n, f in zip(seg.shape[2:], factor)]
            out = np.zeros((*seg.shape[:2], *shape), np.float32)
            for b in range(seg.shape[0]):
                out[b, 0] = resize_segmentation(seg[b, 0], shape, order=0)
            targets.append(out)
        batch["target"] = targets
        del batch["seg"]
        return batch


def baseline(folder: Path, ids: list[str], config: Any, workers: int) -> Any:
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.spatial_transforms import SpatialTransform

    from autoseg.training.augment import batch_transforms, deep_supervision_factors, initial_size, resolve

    patch = tuple(config.patch_size)
    augmentation = resolve("default", patch)
    spatial = augmentation.spatial
    if spatial.dummy_2d:
        raise SystemExit("the baseline does not implement dummy 2D; pick another configuration")
    angle = (-spatial.rotation, spatial.rotation)
    transforms = [SpatialTransform(patch, do_elastic_deform=False, do_rotation=True, angle_x=angle, angle_y=angle,
                                   angle_z=angle, p_rot_per_sample=spatial.p_rotation, do_scale=True,
                                   scale=spatial.scale, p_scale_per_sample=spatial.p_scale,
                                   border_mode_data="constant", border_cval_data=0, order_data=1,
                                   border_mode_seg="constant", border_cval_seg=-1, order_seg=1, random_crop=False)]
    transforms += batch_transforms(augmentation)
    transforms.append(PlainTargets(deep_supervision_factors(config.topology.strides)))
    loader = PlainLoader(folder, ids, patch, initial_size(augmentation, patch), config.batch_size)
    return MultiThreadedAugmenter(loader, Compose(transforms), workers, num_cached_per_queue=6,
                                  seeds=list(range(workers)))


class IndexedSource:
    """autoseg's BatchSource as a batchgenerators data loader (worker t makes batches t, t + n, ...)."""

    def __init__(self, source: Any, workers: int) -> None:
        self.source, self.workers, self.index = source, workers, 0

    def set_thread_id(self, thread_id: int) -> None:
        self.index = thread_id

    def __iter__(self) -> IndexedSource:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = self.source(self.index)
        self.index += self.workers
        return batch


def autoseg_in_mta(folder: Path, ids: list[str], config: Any, workers: int) -> Any:
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter

    from autoseg.training import BatchSource

    source = BatchSource(folder, ids, config, batch_size=config.batch_size, oversample=0.33, augmentation="default",
                         seed=0, deep_supervision=True)
    return MultiThreadedAugmenter(IndexedSource(source, workers), None, workers, num_cached_per_queue=2)


def autoseg_loader(folder: Path, ids: list[str], config: Any, workers: int) -> Any:
    from autoseg.training import make_loader

    return make_loader(folder, ids, config, workers=workers, seed=0)


# ---------------------------------------------------------------- measuring


def worker_pids(loader: Any) -> list[int]:
    if hasattr(loader, "worker_pids"):
        return loader.worker_pids
    return [p.pid for p in getattr(loader, "_processes", [])]


def peak_rss_mb(pids: list[int]) -> float:
    peaks = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        peaks += [int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM")]
    return max(peaks, default=float("nan"))


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by the processes `pids` (from /proc/<pid>/stat)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def measure(make: Any, batches: int, workers: int) -> tuple[float, float, float]:
    """(batches per second after warm-up, CPU ms per batch over workers and main process, largest
    worker peak RSS in MB)."""
    loader = make()
    try:
        for _ in range(2 * max(1, workers)):
            next(loader)
        pids = worker_pids(loader)
        cpu_start, main_start = cpu_seconds(pids), time.process_time()
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(loader)
        rate = batches / (time.perf_counter() - start)
        cpu = cpu_seconds(pids) - cpu_start + time.process_time() - main_start
        assert batch["data"].shape[0] > 0
        return rate, 1000 * cpu / batches, peak_rss_mb(pids)
    finally:
        for stop in ("close", "_finish"):
            if hasattr(loader, stop):
                getattr(loader, stop)()
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--preprocessed", type=Path, default=None, help="reuse/keep this folder")
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, ids, config = prepare(args.data, args.preprocessed or Path(tmp), args.configuration)
        pipelines = {
            "baseline (batchgenerators DataLoader + MTA)": lambda: baseline(folder, ids, config, args.workers),
            "autoseg make_loader": lambda: autoseg_loader(folder, ids, config, args.workers),
            "autoseg batches in batchgenerators MTA": lambda: autoseg_in_mta(folder, ids, config, args.workers),
        }
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in pipelines}
        for round_ in range(args.rounds):
            order = list(pipelines) if round_ % 2 == 0 else list(reversed(pipelines))
            for name in order:
                results[name].append(measure(pipelines[name], args.batches, args.workers))
                rate, cpu, _ = results[name][-1]
                print(f"round {round_ + 1} {name}: {rate:.2f} batches/s, {cpu:.0f} CPU ms/batch", file=sys.stderr)
    print(report(results, args, config, len(ids)))
    if args.markdown:
        args.markdown.write_text(report(results, args, config, len(ids)) + "\n")


def report(results: dict[str, list[tuple[float, float, float]]], args: argparse.Namespace, config: Any,
           n_cases: int) -> str:
    base_runs = results[next(iter(results))]
    base = statistics.median(run[0] for run in base_runs)
    lines = [f"{datetime.date.today()} {platform.machine()} Python {platform.python_version()}, "
             f"{os.cpu_count()} CPUs visible, {args.workers} workers, {args.configuration} patch "
             f"{tuple(config.patch_size)} batch {config.batch_size}, {n_cases} cases, {args.batches} batches x "
             f"{args.rounds} rounds", "",
             "| pipeline | batches/s per round | batches/s median | speed-up: ratio of medians / median of "
             "per-round ratios | CPU ms per batch (median) | CPU ratio | worker peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    base_cpu = statistics.median(run[1] for run in base_runs)
    for name, runs in results.items():
        rates = [run[0] for run in runs]
        paired = statistics.median(rate / base_run[0] for rate, base_run in zip(rates, base_runs))
        cpu = statistics.median(run[1] for run in runs)
        lines.append(f"| {name} | {' '.join(f'{r:.1f}' for r in rates)} | {statistics.median(rates):.2f} | "
                     f"**{statistics.median(rates) / base:.2f}x** / **{paired:.2f}x** | {cpu:.0f} | "
                     f"{base_cpu / cpu:.2f}x | {max(run[2] for run in runs):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
