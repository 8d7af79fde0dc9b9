"""The Dataset contract: what `dataset.json` and the raw folder say, parsed once."""

from __future__ import annotations

from dataclasses import dataclass

DATASET_FORMAT = 1


@dataclass(frozen=True)
class LabelDef:
    """One entry of dataset.json `labels`: a plain label (one value) or a region (several)."""

    name: str
    values: tuple[int, ...]

    @property
    def is_region(self) -> bool:
        return len(self.values) > 1


@dataclass(frozen=True)
class Case:
    """One training case: its channel files in channel order and its label file."""

    case_id: str
    images: tuple[str, ...]
    label: str | None


@dataclass(frozen=True)
class Dataset:
    """A raw dataset in the unchanged nnU-Net v2 layout. Paths are absolute strings."""

    name: str
    root: str
    channel_names: tuple[str, ...]
    labels: tuple[LabelDef, ...]
    file_ending: str
    num_training: int
    cases: tuple[Case, ...]
    ignore_label: int | None = None
    regions_class_order: tuple[int, ...] | None = None
    format: int = DATASET_FORMAT

    @property
    def has_regions(self) -> bool:
        return any(label.is_region for label in self.labels)

    @property
    def label_values(self) -> tuple[int, ...]:
        """Every integer that may occur in a label file (background and ignore included)."""
        values = {v for label in self.labels for v in label.values}
        if self.ignore_label is not None:
            values.add(self.ignore_label)
        return tuple(sorted(values))

    @property
    def foreground_values(self) -> tuple[int, ...]:
        """Label values other than background and ignore, ascending: for regions, the plain integers the
        regions are made of. A cascade stage gets one input channel per value of the previous stage."""
        values = {v for label in self.labels for v in label.values} - {0, self.ignore_label}
        return tuple(sorted(values))

    @property
    def foreground_labels(self) -> tuple[LabelDef, ...]:
        """Labels (or regions) that the network predicts: all but background."""
        return tuple(label for label in self.labels if label.values != (0,))

    @property
    def num_classes(self) -> int:
        """Network output channels: background + plain labels, or one per region."""
        if self.has_regions:
            return len(self.foreground_labels)
        return len(self.foreground_labels) + 1


@dataclass(frozen=True)
class Problem:
    """One fault found in a dataset: which file, what is wrong, how to fix it."""

    path: str
    fault: str
    fix: str
    severity: str = "error"  # "error" stops planning; "warning" is reported only

    def __str__(self) -> str:
        return f"{self.severity.upper()} {self.path}: {self.fault} -> {self.fix}"
