"""Foreground intensity sampling and statistics (pure numpy).

Every case contributes the same number of samples (drawn with replacement), so a few huge
volumes cannot dominate the dataset statistics that CT normalisation uses.
"""

from __future__ import annotations

import zlib

import numpy as np

from autoseg.fingerprint.contract import IntensityStats


def case_rng(case_id: str, seed: int) -> np.random.Generator:
    """A generator that depends on the case and the seed only, not on worker order."""
    return np.random.default_rng([seed, zlib.crc32(case_id.encode("utf-8"))])


def sample_foreground(
    images: np.ndarray, foreground: np.ndarray, count: int, rng: np.random.Generator
) -> np.ndarray:
    """Draw `count` foreground voxel values per channel, with replacement.

    images: (c, z, y, x); foreground: boolean (z, y, x). Returns (c, count) float32, or
    (c, 0) when the case has no foreground.
    """
    values = images[:, foreground]
    if values.shape[1] == 0 or count == 0:
        return np.zeros((images.shape[0], 0), dtype=np.float32)
    picks = rng.integers(0, values.shape[1], size=count)
    return values[:, picks].astype(np.float32, copy=False)


def intensity_stats(samples: np.ndarray) -> IntensityStats:
    """Statistics of one channel's pooled samples; NaN everywhere when there are none."""
    if samples.size == 0:
        nan = float("nan")
        return IntensityStats(nan, nan, nan, nan, nan, nan, nan)
    values = samples.astype(np.float64, copy=False)
    low, median, high = np.percentile(values, [0.5, 50.0, 99.5])
    return IntensityStats(
        mean=float(values.mean()),
        std=float(values.std()),
        median=float(median),
        min=float(values.min()),
        max=float(values.max()),
        percentile_00_5=float(low),
        percentile_99_5=float(high),
    )
