"""Training: the batch loader over the case cache, augmentation presets and background workers.

This package is the one importer of batchgenerators. `make_loader` is the entry point; the rest is
exported for the trainer, tests and benchmarks.
"""

from autoseg.runtime.cpus import allotted_cpus, default_workers
from autoseg.training.augment import PRESETS, Augmentation, SpatialSettings, deep_supervision_factors
from autoseg.training.data import BatchSource, TrainingLoader, make_loader
from autoseg.training.sampling import CacheMissingError, crop_padded, initial_patch_size
from autoseg.training.workers import DataLoaderError, WorkerPool

__all__ = [
    "PRESETS",
    "Augmentation",
    "BatchSource",
    "CacheMissingError",
    "DataLoaderError",
    "SpatialSettings",
    "TrainingLoader",
    "WorkerPool",
    "allotted_cpus",
    "crop_padded",
    "default_workers",
    "deep_supervision_factors",
    "initial_patch_size",
    "make_loader",
]
