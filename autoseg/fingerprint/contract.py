"""The Fingerprint contract: what the planner needs to know about a dataset."""

from __future__ import annotations

from dataclasses import dataclass

FINGERPRINT_FORMAT = 1


@dataclass(frozen=True)
class IntensityStats:
    """Foreground intensity statistics of one channel, pooled over equal samples per case."""

    mean: float
    std: float
    median: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float


@dataclass(frozen=True)
class CaseFingerprint:
    """Per-case facts. Spacing (mm) and shapes are in array order (z, y, x)."""

    case_id: str
    spacing: tuple[float, ...]
    shape: tuple[int, ...]
    shape_after_crop: tuple[int, ...]
    relative_size_after_crop: float


@dataclass(frozen=True)
class Fingerprint:
    """Dataset-level facts: per-case geometry and per-channel foreground intensities."""

    dataset_name: str
    source_hash: str
    channel_names: tuple[str, ...]
    cases: tuple[CaseFingerprint, ...]
    intensity: tuple[IntensityStats, ...]
    median_relative_size_after_crop: float
    samples_per_case: int
    format: int = FINGERPRINT_FORMAT

    @property
    def spacings(self) -> tuple[tuple[float, ...], ...]:
        return tuple(case.spacing for case in self.cases)

    @property
    def shapes_after_crop(self) -> tuple[tuple[int, ...], ...]:
        return tuple(case.shape_after_crop for case in self.cases)
