"""The evaluation contracts: per-label metrics of each case and the summary written as summary.json.

Values that are not defined (the label is absent from both prediction and reference) are stored
as None, not NaN: JSON has no NaN, and None round-trips exactly through save_contract/load_contract.
`hd95` and `nsd` are also None when distances were not computed (`settings.distances` says which).
"""

from __future__ import annotations

from dataclasses import dataclass

from autoseg.errors import AutosegError

EVALUATION_FORMAT = 1


class EvaluationError(AutosegError):
    """Predictions and references cannot be paired or compared (missing file, other shape)."""


@dataclass(frozen=True)
class LabelMetrics:
    """Metrics of one label (or region) in one case.

    tp/fp/fn/tn are voxel counts, ignored voxels excluded. dice/iou/hd95/nsd are None when the
    label is absent from both masks; with exactly one empty, dice = iou = nsd = 0 and hd95 is the
    image diagonal in mm. Volumes are in mm^3 (2D images: mm^2 x 1 mm).
    """

    name: str
    values: tuple[int, ...]
    tp: int
    fp: int
    fn: int
    tn: int
    dice: float | None
    iou: float | None
    volume_pred_mm3: float
    volume_ref_mm3: float
    hd95: float | None = None
    nsd: float | None = None

    @property
    def n_pred(self) -> int:
        """Predicted voxels of this label."""
        return self.tp + self.fp

    @property
    def n_ref(self) -> int:
        """Reference voxels of this label."""
        return self.tp + self.fn


@dataclass(frozen=True)
class CaseEvaluation:
    """All label metrics of one case, with the two files compared (absolute paths)."""

    case_id: str
    prediction: str
    reference: str
    metrics: tuple[LabelMetrics, ...]

    def label(self, name: str) -> LabelMetrics:
        """The metrics of label `name` (KeyError when it was not evaluated)."""
        for metrics in self.metrics:
            if metrics.name == name:
                return metrics
        raise KeyError(name)


@dataclass(frozen=True)
class LabelMean:
    """Means of one label over the cases where it is defined (present in prediction or reference).

    n_cases: cases evaluated; n_defined: cases entering the means; the rest had the label in
    neither mask. A mean is None when no case defines it (hd95/nsd also when distances were off).
    """

    dice: float | None
    iou: float | None
    hd95: float | None
    nsd: float | None
    n_cases: int
    n_defined: int

    @property
    def n_empty(self) -> int:
        """Cases where the label is absent from both prediction and reference."""
        return self.n_cases - self.n_defined


@dataclass(frozen=True)
class EvaluationSettings:
    """How the metrics were computed: distances on/off, NSD tolerance (mm), ignored label value."""

    distances: bool
    tolerance_mm: float
    ignore_label: int | None = None


@dataclass(frozen=True)
class EvaluationSummary:
    """What `evaluate_folder` writes to summary.json.

    mean: per label name (in label order), the means over cases. foreground_mean: the mean over
    labels of their mean Dice, the single number used to rank setups (None if no label is defined).
    missing_predictions: reference cases that had no prediction and were not evaluated.
    """

    cases: tuple[CaseEvaluation, ...]
    mean: dict[str, LabelMean]
    foreground_mean: float | None
    settings: EvaluationSettings
    missing_predictions: tuple[str, ...] = ()
    format: int = EVALUATION_FORMAT
