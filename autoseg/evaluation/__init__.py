"""Evaluation stage: metrics (pure), evaluation of a prediction folder, summary.json, choice of the best setup.

Importing this package loads numpy only; scipy and SimpleITK load when a metric or file needs them.
"""

from autoseg.evaluation.contract import (
    CaseEvaluation,
    EvaluationError,
    EvaluationSettings,
    EvaluationSummary,
    LabelMean,
    LabelMetrics,
)
from autoseg.evaluation.evaluate import (
    evaluate_arrays,
    evaluate_folder,
    load_summary,
    metric_spacing,
    pair_cases,
    summarize,
    summary_rows,
)
from autoseg.evaluation.find_best import (
    BestChoice,
    CandidateScore,
    collect_cross_validation,
    find_best,
    inference_instructions,
    load_best,
)
from autoseg.evaluation.metrics import (
    Counts,
    SurfaceScores,
    confusion_counts,
    dice_score,
    hausdorff95,
    image_diagonal_mm,
    iou_score,
    normalized_surface_dice,
    surface,
    surface_distances,
    surface_scores,
    volume_mm3,
)

__all__ = [
    "BestChoice",
    "CandidateScore",
    "CaseEvaluation",
    "Counts",
    "EvaluationError",
    "EvaluationSettings",
    "EvaluationSummary",
    "LabelMean",
    "LabelMetrics",
    "SurfaceScores",
    "collect_cross_validation",
    "confusion_counts",
    "dice_score",
    "evaluate_arrays",
    "evaluate_folder",
    "find_best",
    "hausdorff95",
    "image_diagonal_mm",
    "inference_instructions",
    "iou_score",
    "load_best",
    "load_summary",
    "metric_spacing",
    "normalized_surface_dice",
    "pair_cases",
    "summarize",
    "summary_rows",
    "surface",
    "surface_distances",
    "surface_scores",
    "volume_mm3",
]
