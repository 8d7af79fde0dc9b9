"""The training loader: random patches from the case cache, augmented, with deep-supervision targets.

    loader = make_loader(cache_folder, train_ids, plans.configurations["3d_fullres"], seed=fold)
    with loader:
        for step, batch in zip(range(250), loader):
            batch["data"]    # float32 (b, c, *patch)
            batch["target"]  # list of uint8/int16 (b, 1, *patch // cumulative stride), highest resolution first

Axes follow the cache: (z, y, x) for 3d configurations, (y, x) slices for 2d ones. Batch i is a pure
function of (seed, i): the same seed gives the same batches with any number of workers, and a resumed
run can continue at `start=i`. numpy only; the trainer converts to torch.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.errors import SettingsError
from autoseg.log import get_logger
from autoseg.planning.contract import Configuration
from autoseg.preprocessing.previous import one_hot
from autoseg.runtime.cpus import allotted_cpus, default_workers
from autoseg.training.augment import (
    Augmentation,
    batch_transforms,
    deep_supervision_factors,
    downsample_target,
    draw_spatial,
    initial_size,
    input_box,
    perturb_previous,
    resample_sample,
    resolve,
    sample_points,
)
from autoseg.training.sampling import CaseCache, PatchBox, choose_boxes, read_box
from autoseg.training.workers import WorkerPool

log = get_logger("training")


class BatchSource:
    """Makes batch i from (seed, i): picklable, so it runs the same in the main process or a worker.

    Per sample: choose a box (cases with replacement, foreground oversampling), draw rotation and
    scaling (p 0.2 each), read the part of the enlarged "initial" patch the drawn transform samples
    (just the patch when neither applies) and resample it; then the batch transforms, -1 -> 0 in the
    target, and the target downsampled per decoder output.
    """

    def __init__(self, folder: str | Path, case_ids: Sequence[str], config: Configuration, *, batch_size: int,
                 oversample: float, augmentation: str, seed: int, deep_supervision: bool,
                 previous_dir: str | Path | None = None, previous_values: Sequence[int] = ()) -> None:
        self.cache = CaseCache(folder, case_ids, previous=previous_dir)
        self.previous_values = tuple(int(v) for v in previous_values)
        self.patch = tuple(int(p) for p in config.patch_size)
        self.batch_size, self.oversample, self.seed = batch_size, oversample, seed
        self.augmentation: Augmentation = resolve(augmentation, self.patch)
        self.initial_patch = initial_size(self.augmentation, self.patch)
        masked = [i for i, used in enumerate(config.use_mask_for_norm) if used]
        self.transforms = batch_transforms(self.augmentation, masked_channels=masked)
        self.factors = deep_supervision_factors(config.topology.strides, enabled=deep_supervision)
        self.target_dtype = np.uint8 if self.cache.seg_dtype.itemsize == 1 else np.int16

    def __call__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, index]))
        with _global_random_state(int(rng.integers(2**32))):
            boxes = choose_boxes(self.cache, self.patch, self.batch_size, oversample=self.oversample, rng=rng)
            samples = [self._sample(box, rng) for box in boxes]
            batch = {"data": np.stack([s[0] for s in samples]), "seg": np.stack([s[1] for s in samples])}
            for transform in self.transforms:
                batch = transform(**batch)
        data, seg = batch["data"], batch["seg"]
        if self.cache.previous is not None:  # cascade: the 2nd seg channel becomes one-hot data channels
            previous = one_hot(seg[:, 1], self.previous_values, axis=1)
            if self.augmentation.perturb_previous:
                perturb_previous(previous, rng)
            data, seg = np.concatenate([data, previous], axis=1), seg[:, :1]
        seg[seg < 0] = 0
        seg = seg.astype(self.target_dtype)
        return {
            "data": np.ascontiguousarray(data, dtype=np.float32),
            "target": [downsample_target(seg, f) if any(v > 1 for v in f) else seg for f in self.factors],
            "case_ids": tuple(self.cache.case_ids[box.case] for box in boxes),
            "forced": np.array([box.forced for box in boxes]),
            "index": index,
        }

    def _sample(self, box: PatchBox, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(c, *patch) float32 and (1, *patch) int16 (2 channels with a previous stage) for one box."""
        spatial = self.augmentation.spatial
        draw = draw_spatial(spatial, rng, len(self.patch))
        if spatial is None or draw is None:
            data, seg = read_box(self.cache, box, box.lower, size=self.patch)
            return data.astype(np.float32, copy=False), seg.astype(np.int16)
        plane = 1 if spatial.dummy_2d else 0  # dummy 2D: axis 0 is read as is, slices resampled in-plane
        points = sample_points(self.patch[plane:], draw)
        lower, size, points = input_box(points, box.lower[plane:], self.patch[plane:])
        lower, size = (*box.lower[:plane], *lower), (*self.patch[:plane], *size)
        data, seg = read_box(self.cache, box, lower, size=size)
        return resample_sample(data, seg, points, settings=spatial)


@contextmanager
def _global_random_state(seed: int) -> Iterator[None]:
    """Seed numpy's and Python's global generators (batchgenerators draws from them) for one batch,
    restoring the caller's state afterwards so an in-process loader does not disturb it."""
    saved_np, saved_py = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved_np)
        random.setstate(saved_py)


class TrainingLoader:
    """An endless iterator of batches (see `make_loader`); owns its worker processes.

    Close it (or use `with`) to stop the workers; it is also closed when garbage-collected.
    """

    def __init__(self, source: BatchSource, *, workers: int, start: int = 0, prefetch: int = 2) -> None:
        self.source, self.workers = source, workers
        self._next = start
        self._pool = WorkerPool(source, workers=workers, start=start, prefetch=prefetch) if workers > 0 else None

    def __iter__(self) -> TrainingLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = self._pool.get() if self._pool is not None else self.source(self._next)
        self._next += 1
        return batch

    @property
    def worker_pids(self) -> list[int]:
        return self._pool.pids if self._pool is not None else []

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> TrainingLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_loader(
    folder: str | Path, case_ids: Sequence[str], config: Configuration, *, batch_size: int | None = None,
    oversample: float = 0.33, augmentation: str = "default", workers: int | None = None, seed: int = 0,
    deep_supervision: bool = True, start: int = 0, prefetch: int = 2, previous_dir: str | Path | None = None,
    previous_values: Sequence[int] = (),
) -> TrainingLoader:
    """An endless loader of training (or, with augmentation="none", validation) batches.

    folder: the configuration's case cache (`<preprocessed>/<config.data_id>`); case_ids: the cases
    to draw from (with replacement). batch_size defaults to the configuration's. The last
    round(oversample * batch_size) samples of each batch are centred on a random class present in their
    case. augmentation: a preset name ("default", "none"). workers: background processes, by default
    from the CPUs allotted to this process (affinity, cgroup quota, SLURM_CPUS_PER_TASK); 0 makes
    batches in the calling process. Batch i depends only on (seed, i); `start` skips to batch `start`.
    Each item: data float32 (b, c, *patch); target: one (b, 1, *patch / f) array per decoder output,
    highest resolution first (one only without deep supervision), uint8 for int8 caches else int16,
    -1 (outside the body) mapped to 0; case_ids; forced (bool (b,)); index.
    Cascade: `previous_dir` holds the previous stage's segmentation per case (on the cache's grid); data
    then ends with one 0/1 channel per value of `previous_values`, moved and mirrored with the image but
    not intensity-augmented.
    """
    batch_size = config.batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise SettingsError(f"batch size must be at least 1, got {batch_size}", hint="pass --batch-size 1 or more")
    if not 0.0 <= oversample <= 1.0:
        raise SettingsError(f"oversample must be in [0, 1], got {oversample}", hint="e.g. --oversample 0.33")
    if workers is not None and workers < 0:
        raise SettingsError(f"workers must be 0 or more, got {workers}", hint="use --workers 0 for no background "
                            "processes")
    source = BatchSource(folder, case_ids, config, batch_size=batch_size, oversample=oversample,
                         augmentation=augmentation, seed=seed, deep_supervision=deep_supervision,
                         previous_dir=previous_dir, previous_values=previous_values)
    if workers is None:
        cpus = allotted_cpus()
        workers = default_workers(cpus)
        log.info("loader: %d workers for %d allotted CPUs%s (set --workers to change)", workers, cpus,
                 f", shared by {os.environ['LOCAL_WORLD_SIZE']} processes" if "LOCAL_WORLD_SIZE" in os.environ else "")
    return TrainingLoader(source, workers=workers, start=start, prefetch=prefetch)
