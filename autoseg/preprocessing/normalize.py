"""Intensity normalisation schemes, one registry entry each (pure numpy, float32).

The plan names a scheme per channel: "ct" uses dataset-wide foreground statistics (Hounsfield
units mean the same in every scan), "zscore" uses each image's own statistics (MRI scales are
arbitrary), optionally only inside the body mask so zero padding does not skew them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from autoseg.fingerprint.contract import IntensityStats
from autoseg.registry import Registry

Scheme = Callable[..., np.ndarray]
SCHEMES: Registry[Scheme] = Registry("normalization scheme")
EPS = 1e-8


@SCHEMES.register("ct")
def ct_normalize(x: np.ndarray, *, stats: IntensityStats, mask: np.ndarray | None) -> np.ndarray:
    """Clip to the dataset's foreground 0.5-99.5 percentiles, then z-score with its mean and std."""
    clipped = np.clip(x, stats.percentile_00_5, stats.percentile_99_5)
    return ((clipped - stats.mean) / max(stats.std, EPS)).astype(np.float32)


@SCHEMES.register("zscore")
def zscore_normalize(x: np.ndarray, *, stats: IntensityStats, mask: np.ndarray | None) -> np.ndarray:
    """Per-image z-score; with a mask, statistics and changes only inside it, zero outside."""
    if mask is None:
        return ((x - x.mean()) / max(float(x.std()), EPS)).astype(np.float32)
    values = x[mask]
    out = np.zeros(x.shape, dtype=np.float32)
    if values.size:
        out[mask] = (values - values.mean()) / max(float(values.std()), EPS)
    return out


@SCHEMES.register("rescale01")
def rescale_normalize(x: np.ndarray, *, stats: IntensityStats, mask: np.ndarray | None) -> np.ndarray:
    """Per-image min-max to [0, 1]."""
    low, high = float(x.min()), float(x.max())
    return ((x - low) / max(high - low, EPS)).astype(np.float32)


@SCHEMES.register("rgb01")
def rgb_normalize(x: np.ndarray, *, stats: IntensityStats, mask: np.ndarray | None) -> np.ndarray:
    """8-bit colour channels to [0, 1]."""
    return (x / 255.0).astype(np.float32)


@SCHEMES.register("none")
def no_normalize(x: np.ndarray, *, stats: IntensityStats, mask: np.ndarray | None) -> np.ndarray:
    return x.astype(np.float32)


def normalize(
    images: np.ndarray,
    *,
    schemes: Sequence[str],
    use_mask: Sequence[bool],
    intensity: Sequence[IntensityStats],
    body: np.ndarray | None = None,
) -> np.ndarray:
    """Normalise each channel of (c, z, y, x) images with its planned scheme (float32 out).

    `body` is the boolean (z, y, x) mask inside the scanned region; it is used for the channels
    whose `use_mask` is set.
    """
    out = np.empty(images.shape, dtype=np.float32)
    for c, (name, masked, stats) in enumerate(zip(schemes, use_mask, intensity, strict=True)):
        scheme = SCHEMES.get(name)
        out[c] = scheme(images[c], stats=stats, mask=body if masked else None)
    return out
