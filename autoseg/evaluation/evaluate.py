"""Evaluate predictions against references: label maps in memory, or two folders of files.

`evaluate_arrays` turns one pair of label maps into per-label metrics; `evaluate_folder` pairs the
files of two folders by name, evaluates them (in parallel when asked) and writes summary.json.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from autoseg.dataset.contract import LabelDef
from autoseg.evaluation.contract import (
    CaseEvaluation,
    EvaluationError,
    EvaluationSettings,
    EvaluationSummary,
    LabelMean,
    LabelMetrics,
)
from autoseg.evaluation.metrics import confusion_counts, dice_score, iou_score, surface_scores, volume_mm3
from autoseg.io.geometry import Geometry
from autoseg.io.readers import read_header, read_label
from autoseg.log import get_logger, progress
from autoseg.runtime.processes import process_pool
from autoseg.serialization import load_contract, save_contract

log = get_logger("evaluation")

SUMMARY_NAME = "summary.json"


def evaluate_arrays(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: Sequence[LabelDef],
    *,
    spacing: tuple[float, ...],
    ignore_label: int | None = None,
    distances: bool = False,
    tolerance_mm: float = 1.0,
) -> tuple[LabelMetrics, ...]:
    """Metrics of each label in `labels` for two integer label maps of equal shape (z, y, x).

    A label's mask is `isin(map, label.values)`, so a region covers all its values. Voxels where
    `ref == ignore_label` are removed from both masks and from every count. `spacing` is mm per
    voxel in array order. With `distances`, HD95 (mm) and NSD at `tolerance_mm` are added.
    Pass foreground labels only (`Dataset.foreground_labels`): background is not a structure.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise EvaluationError(
            f"prediction shape {pred.shape} differs from the reference shape {ref.shape}",
            hint="predictions must be exported on the reference's voxel grid",
        )
    if len(spacing) != ref.ndim:
        raise ValueError(f"spacing {tuple(spacing)} needs one value per axis of shape {ref.shape}")
    valid = None if ignore_label is None else ref != ignore_label
    return tuple(
        _label_metrics(pred, ref, label, spacing, valid, distances=distances, tolerance_mm=tolerance_mm)
        for label in labels
    )


def _label_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    label: LabelDef,
    spacing: tuple[float, ...],
    valid: np.ndarray | None,
    *,
    distances: bool,
    tolerance_mm: float,
) -> LabelMetrics:
    pred_mask, ref_mask = _mask(pred, label.values), _mask(ref, label.values)
    if valid is not None:
        pred_mask &= valid
        ref_mask &= valid
    counts = confusion_counts(pred_mask, ref_mask, valid)
    hd95 = nsd = None
    if distances:
        scores = surface_scores(pred_mask, ref_mask, spacing, tolerance_mm=tolerance_mm)
        hd95, nsd = _defined(scores.hd95), _defined(scores.nsd)
    return LabelMetrics(
        name=label.name,
        values=tuple(label.values),
        tp=counts.tp,
        fp=counts.fp,
        fn=counts.fn,
        tn=counts.tn,
        dice=_defined(dice_score(counts)),
        iou=_defined(iou_score(counts)),
        volume_pred_mm3=volume_mm3(counts.tp + counts.fp, spacing),
        volume_ref_mm3=volume_mm3(counts.tp + counts.fn, spacing),
        hd95=hd95,
        nsd=nsd,
    )


def _mask(label_map: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    if len(values) == 1:
        return np.asarray(label_map == values[0])
    return np.isin(label_map, values)


def _defined(value: float) -> float | None:
    """NaN (not defined) becomes None, which JSON can store."""
    return None if np.isnan(value) else float(value)


def evaluate_folder(
    pred_dir: str | Path,
    ref_dir: str | Path,
    labels: Sequence[LabelDef],
    *,
    file_ending: str,
    ignore_label: int | None = None,
    distances: bool = False,
    tolerance_mm: float = 1.0,
    workers: int = 1,
    output: str | Path | None = None,
    cases: Sequence[str] | None = None,
) -> EvaluationSummary:
    """Evaluate every `CASE<file_ending>` in `pred_dir` against the file of the same name in `ref_dir`.

    A prediction without reference or with another shape raises EvaluationError before any work;
    references without prediction are logged and listed in the summary. The summary is written
    atomically to `output` (default `pred_dir/summary.json`) and returned. `cases` restricts the
    evaluation to those case ids (a fold's validation cases among all references).
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    pairs, missing = pair_cases(pred_dir, ref_dir, file_ending)
    if cases is not None:
        wanted = set(cases)
        pairs = [pair for pair in pairs if pair[0] in wanted]
        missing = sorted(wanted - {pair[0] for pair in pairs})
        if not pairs:
            raise EvaluationError("none of the requested cases has a prediction", path=pred_dir,
                                  hint="predict them first, or check the case ids")
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        log.warning("%d reference case(s) have no prediction and are not evaluated: %s", len(missing), shown)
    _check_headers(pairs)
    settings = EvaluationSettings(distances=distances, tolerance_mm=float(tolerance_mm), ignore_label=ignore_label)
    job = partial(_evaluate_case, labels=tuple(labels), settings=settings)
    evaluated = tuple(progress(_run(job, pairs, workers), total=len(pairs), description="evaluating"))
    summary = summarize(evaluated, settings, missing_predictions=tuple(missing))
    target = Path(output) if output is not None else pred_dir / SUMMARY_NAME
    save_contract(target, summary)
    log.info("evaluated %d cases: foreground mean Dice %s -> %s", len(evaluated), _fmt(summary.foreground_mean), target)
    return summary


def pair_cases(
    pred_dir: Path, ref_dir: Path, file_ending: str
) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(case_id, prediction, reference) for every prediction, and the reference cases lacking one."""
    for folder, role in ((pred_dir, "prediction"), (ref_dir, "reference")):
        if not folder.is_dir():
            raise EvaluationError(f"{role} folder not found", path=folder, hint="check the path")
    predictions = _case_files(pred_dir, file_ending)
    references = _case_files(ref_dir, file_ending)
    if not predictions:
        raise EvaluationError(
            f"no prediction files ending in {file_ending!r}",
            path=pred_dir,
            hint="check the folder and the file ending (dataset.json `file_ending`)",
        )
    orphans = sorted(set(predictions) - set(references))
    if orphans:
        shown = ", ".join(predictions[c].name for c in orphans[:5]) + (" ..." if len(orphans) > 5 else "")
        raise EvaluationError(
            f"{len(orphans)} prediction(s) have no reference file of the same name in {ref_dir}: {shown}",
            path=predictions[orphans[0]],
            hint="point the reference folder at the matching labels, or remove predictions of other cases",
        )
    pairs = [(case, predictions[case], references[case]) for case in sorted(predictions)]
    return pairs, sorted(set(references) - set(predictions))


def _case_files(folder: Path, file_ending: str) -> dict[str, Path]:
    return {
        path.name[: -len(file_ending)]: path
        for path in sorted(folder.iterdir())
        if path.name.endswith(file_ending) and not path.name.startswith(".") and path.is_file()
    }


def _check_headers(pairs: list[tuple[str, Path, Path]]) -> None:
    """Fail on a shape mismatch from the headers alone, before minutes of work; warn on spacing."""
    for _, pred_path, ref_path in pairs:
        pred_geometry, _ = read_header(pred_path)
        ref_geometry, _ = read_header(ref_path)
        if pred_geometry.shape != ref_geometry.shape:
            raise EvaluationError(
                f"prediction shape {pred_geometry.shape} (z, y, x) differs from the reference's "
                f"{ref_geometry.shape} ({ref_path})",
                path=pred_path,
                hint="export predictions on the reference's voxel grid (autoseg predict does this)",
            )
        spacing_error = pred_geometry.differences(ref_geometry).get("spacing", 0.0)
        if spacing_error > 1e-3:
            log.warning("%s: spacing differs from the reference by %.3g mm; using the reference's",
                        pred_path.name, spacing_error)


def _run(job: partial[CaseEvaluation], pairs: list[tuple[str, Path, Path]], workers: int) -> Iterator[CaseEvaluation]:
    if workers <= 1 or len(pairs) < 2:
        yield from (job(*pair) for pair in pairs)
        return
    with process_pool(min(workers, len(pairs))) as pool:
        futures = [pool.submit(job, *pair) for pair in pairs]
        for future in futures:
            yield future.result()


def _evaluate_case(
    case_id: str, pred_path: Path, ref_path: Path, *, labels: tuple[LabelDef, ...], settings: EvaluationSettings
) -> CaseEvaluation:
    """Read one pair and evaluate it with the reference's spacing (a top-level function: picklable)."""
    pred, _ = read_label(pred_path)
    ref, geometry = read_label(ref_path)
    if pred.shape != ref.shape:
        raise EvaluationError(f"prediction shape {pred.shape} differs from the reference's {ref.shape}",
                              path=pred_path, hint="export predictions on the reference's voxel grid")
    metrics = evaluate_arrays(
        pred,
        ref,
        labels,
        spacing=metric_spacing(geometry),
        ignore_label=settings.ignore_label,
        distances=settings.distances,
        tolerance_mm=settings.tolerance_mm,
    )
    return CaseEvaluation(case_id=case_id, prediction=str(pred_path.resolve()),
                          reference=str(ref_path.resolve()), metrics=metrics)


def metric_spacing(geometry: Geometry) -> tuple[float, ...]:
    """Array-order spacing for metrics; 2D images get 1 mm along z (not the planner's dummy 999 mm),
    so their 'volumes' are areas in mm^2."""
    if geometry.dim == 2:
        return (1.0, *geometry.array_spacing[1:])
    return geometry.array_spacing


def summarize(
    cases: Sequence[CaseEvaluation], settings: EvaluationSettings, *, missing_predictions: tuple[str, ...] = ()
) -> EvaluationSummary:
    """Per-label means over cases (undefined values excluded) and the foreground mean Dice."""
    names = list(dict.fromkeys(m.name for case in cases for m in case.metrics))
    mean = {}
    for name in names:
        rows = [m for case in cases for m in case.metrics if m.name == name]
        mean[name] = LabelMean(
            dice=_mean([m.dice for m in rows]),
            iou=_mean([m.iou for m in rows]),
            hd95=_mean([m.hd95 for m in rows]),
            nsd=_mean([m.nsd for m in rows]),
            n_cases=len(rows),
            n_defined=sum(m.dice is not None for m in rows),
        )
    return EvaluationSummary(
        cases=tuple(cases),
        mean=mean,
        foreground_mean=_mean([label.dice for label in mean.values()]),
        settings=settings,
        missing_predictions=tuple(missing_predictions),
    )


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def load_summary(path: str | Path) -> EvaluationSummary:
    """Read a summary.json written by `evaluate_folder`."""
    return load_contract(path, EvaluationSummary, rerun="autoseg evaluate PRED_DIR REF_DIR")


def summary_rows(summary: EvaluationSummary) -> list[tuple[str, ...]]:
    """A header and one row per label (plus a mean row) of formatted numbers, for a CLI table.

    n is 'cases defining the label / cases evaluated'; '-' marks a value not defined or not computed.
    """
    tolerance = f"NSD@{summary.settings.tolerance_mm:g}mm"
    rows: list[tuple[str, ...]] = [("label", "Dice", "IoU", "HD95 mm", tolerance, "n")]
    for name, m in summary.mean.items():
        rows.append((name, _fmt(m.dice), _fmt(m.iou), _fmt(m.hd95, 2), _fmt(m.nsd), f"{m.n_defined}/{m.n_cases}"))
    labels = list(summary.mean.values())
    rows.append((
        "mean",
        _fmt(summary.foreground_mean),
        _fmt(_mean([m.iou for m in labels])),
        _fmt(_mean([m.hd95 for m in labels]), 2),
        _fmt(_mean([m.nsd for m in labels])),
        str(len(summary.cases)),
    ))
    return rows


def _fmt(value: float | None, decimals: int = 4) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"
