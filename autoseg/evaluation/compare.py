"""`autoseg compare`: every trained model folder of a dataset side by side, so the trade-offs of the network
families (accuracy, size, speed, memory) are one table and one figure instead of JSON files to read.

Per model folder (`CONFIG__PLANS`, one family and configuration) with at least one finished fold:

* Dice per class: the cross-validation that `autoseg find-best` evaluated (`crossval/NAME/summary.json`)
  when it exists, else the finished folds' end-of-training validations pooled (each label's mean weighted
  by the cases that define it); `dice_source` says which.
* parameters, receptive field (voxels, array order) and estimated training memory (GiB): the plans.
* seconds per training iteration: median over the folds' epochs of metrics.jsonl (training steps only
  where the record has `train_seconds`; older records: the epoch's seconds, validation batches included).
* prediction seconds per case: the folds' validation predictions (`validation/timing.json`, sliding window
  with TTA, resampling and writing included), on the device training used.
* measured peak memory (GiB): the largest of the folds' records, `cuda_allocated` or `cpu_rss`.

Written beside find-best's result: `comparison.json` (the contract), `comparison.md`, `comparison.png`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from autoseg.evaluation.evaluate import SUMMARY_NAME, load_summary
from autoseg.evaluation.find_best import CROSSVAL_DIR
from autoseg.log import get_logger
from autoseg.model_folder import ModelFolder
from autoseg.serialization import atomic_write, read_json, save_contract

log = get_logger("evaluation")

COMPARISON_FILE = "comparison.json"
TABLE_FILE = "comparison.md"
FIGURE_FILE = "comparison.png"
COMPARISON_FORMAT = 1
#: Written by the fold's validation (autoseg.inference.validation.TIMING_FILE; not imported: no torch here).
TIMING_FILE = "timing.json"


@dataclass(frozen=True)
class ModelRow:
    """One trained model folder. `dice`: (label name, mean Dice or None) in label order."""

    model: str
    configuration: str
    plans: str
    network: str
    folds: tuple[str, ...]
    dice: tuple[tuple[str, float | None], ...]
    dice_source: str  # "cross-validation", "fold validation" or "none"
    mean_dice: float | None
    parameters: int
    receptive_field: tuple[int, ...]
    seconds_per_iteration: float | None
    prediction_seconds_per_case: float | None
    estimated_memory_gib: float
    peak_memory_gib: float | None
    memory_kind: str | None


@dataclass(frozen=True)
class Comparison:
    """What `compare` writes to comparison.json: one row per trained model folder, by name."""

    dataset: str
    rows: tuple[ModelRow, ...]
    format: int = COMPARISON_FORMAT


def compare(results: Path) -> Comparison:
    """The comparison of every model folder under `results` (= <results>/<dataset name>) with a finished fold."""
    results = Path(results)
    folders = sorted(p for p in results.iterdir() if p.is_dir() and "__" in p.name and p.name != CROSSVAL_DIR) \
        if results.is_dir() else []
    rows = tuple(row for row in (_row(results, ModelFolder(path)) for path in folders) if row is not None)
    return Comparison(dataset=results.name, rows=rows)


def write_comparison(results: Path, comparison: Comparison | None = None) -> Comparison:
    """compare(results) (unless given) written as comparison.json, comparison.md and comparison.png."""
    results = Path(results)
    comparison = comparison or compare(results)
    save_contract(results / COMPARISON_FILE, comparison)
    text = markdown_table(comparison)
    atomic_write(results / TABLE_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    if comparison.rows:
        from autoseg.evaluation.compare_figure import plot_comparison

        plot_comparison(comparison, results / FIGURE_FILE)
    log.info("comparison of %d model folder(s) written to %s", len(comparison.rows), results / TABLE_FILE)
    return comparison


def table_rows(comparison: Comparison) -> list[tuple[str, ...]]:
    """A header and one row of formatted values per model folder ('-' where not measured)."""
    labels = _label_names(comparison)
    header = ("model", "network", "folds", *(f"Dice {name}" for name in labels), "mean Dice", "params (M)",
              "receptive field", "s/iteration", "predict s/case", "est. GiB", "peak GiB")
    rows = [header]
    for row in comparison.rows:
        dice = dict(row.dice)
        peak = "-" if row.peak_memory_gib is None else f"{row.peak_memory_gib:.2f} ({row.memory_kind})"
        rows.append((row.model, row.network, ",".join(row.folds), *(_num(dice.get(name), 3) for name in labels),
                     _num(row.mean_dice, 3), f"{row.parameters / 1e6:.2f}", "x".join(map(str, row.receptive_field)),
                     _num(row.seconds_per_iteration, 2), _num(row.prediction_seconds_per_case, 2),
                     f"{row.estimated_memory_gib:.2f}", peak))
    return rows


def markdown_table(comparison: Comparison) -> str:
    """comparison.md: the table, with where each number comes from."""
    rows = table_rows(comparison)
    lines = [f"# Trained models of {comparison.dataset}", ""]
    if not comparison.rows:
        return "\n".join(lines + ["No model folder has a finished fold yet (autoseg train).", ""])
    lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    sources = sorted({row.dice_source for row in comparison.rows})
    lines += ["", f"Dice: {', '.join(sources)} (cross-validation once `autoseg find-best` has run). "
              "s/iteration: median training step; predict s/case: the folds' validation predictions (TTA, "
              "resampling and writing included); est. GiB: the planner's training-memory estimate; peak GiB: "
              "measured during training (cuda_allocated on a GPU, cpu_rss on CPU, not the same quantity).", ""]
    return "\n".join(lines)


def _row(results: Path, folder: ModelFolder) -> ModelRow | None:
    folds = folder.folds("final")
    if not folds or not folder.plans_file.is_file():
        return None
    configuration, plans_name = folder.root.name.rsplit("__", 1)
    plans = folder.load_plans()
    if configuration not in plans.configurations:
        log.warning("%s: configuration %s is not in its plans.json; skipped", folder.root, configuration)
        return None
    config = plans.configurations[configuration]
    from autoseg.model.families import family_of
    from autoseg.training.progress import read_metrics

    dice, source = _dice(results, folder, folds)
    defined = [value for _, value in dice if value is not None]
    records = {fold: read_metrics(folder.fold_dir(fold) / "metrics.jsonl") for fold in folds}  # read once
    peak = _peak([r for fold_records in records.values() for r in fold_records])
    return ModelRow(
        model=folder.root.name, configuration=configuration, plans=plans_name,
        network=family_of(config.topology).name, folds=folds, dice=dice, dice_source=source,
        mean_dice=sum(defined) / len(defined) if defined else None, parameters=config.parameter_count,
        receptive_field=tuple(config.receptive_field), seconds_per_iteration=_seconds_per_iteration(folder, records),
        prediction_seconds_per_case=_prediction_seconds(folder, folds),
        estimated_memory_gib=config.estimated_memory_gb,
        peak_memory_gib=None if peak is None else peak[0], memory_kind=None if peak is None else peak[1])


Dice = tuple[tuple[str, float | None], ...]


def _dice(results: Path, folder: ModelFolder, folds: tuple[str, ...]) -> tuple[Dice, str]:
    crossval = results / CROSSVAL_DIR / folder.root.name / SUMMARY_NAME
    if crossval.is_file():
        summary = load_summary(crossval)
        return tuple((name, mean.dice) for name, mean in summary.mean.items()), "cross-validation"
    totals: dict[str, list[float]] = {}
    for fold in folds:
        path = folder.validation_dir(fold) / SUMMARY_NAME
        if path.is_file():
            for name, mean in load_summary(path).mean.items():
                weighted = totals.setdefault(name, [0.0, 0.0])
                if mean.dice is not None:
                    weighted[0] += mean.dice * mean.n_defined
                    weighted[1] += mean.n_defined
    if not totals:
        return (), "none"
    return tuple((name, total / n if n else None) for name, (total, n) in totals.items()), "fold validation"


def _seconds_per_iteration(folder: ModelFolder, records: dict[str, list[dict]]) -> float | None:
    values = []
    for fold, fold_records in records.items():
        settings = folder.fold_settings_file(fold)
        fallback = read_json(settings).get("iterations_per_epoch") if settings.is_file() else None
        for record in fold_records:
            iterations = record.get("iterations") or fallback
            seconds = record.get("train_seconds", record.get("epoch_seconds"))
            if iterations and seconds is not None:
                values.append(seconds / iterations)
    return statistics.median(values) if values else None


def _prediction_seconds(folder: ModelFolder, folds: tuple[str, ...]) -> float | None:
    seconds = cases = 0.0
    for fold in folds:
        path = folder.validation_dir(fold) / TIMING_FILE
        if path.is_file():
            timing = read_json(path)
            seconds, cases = seconds + float(timing["seconds"]), cases + int(timing["cases"])
    return seconds / cases if cases else None


def _peak(records: list[dict]) -> tuple[float, str] | None:
    """The largest recorded peak memory (GiB) of the folds' epochs and its kind; None if none was recorded."""
    measured = [r for r in records if "peak_memory_gib" in r]
    if not measured:
        return None
    top = max(measured, key=lambda r: r["peak_memory_gib"])
    return float(top["peak_memory_gib"]), str(top.get("memory_kind", "unknown"))


def _label_names(comparison: Comparison) -> list[str]:
    names: list[str] = []
    for row in comparison.rows:
        names += [name for name, _ in row.dice if name not in names]
    return names


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
