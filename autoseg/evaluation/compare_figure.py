"""comparison.png: the trained models' trade-offs in one figure (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autoseg.evaluation.compare import Comparison
from autoseg.serialization import atomic_write


def plot_comparison(comparison: Comparison, path: Path) -> None:
    """Five panels, one bar (or bar group) per model folder: Dice per class, parameters, seconds per training
    iteration, prediction seconds per case, estimated vs measured peak memory. Unmeasured values are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison.rows
    names = [f"{row.network if row.plans == 'autoseg' else row.plans} {row.configuration}" for row in rows]
    fig, axes = plt.subplots(1, 5, figsize=(4 + 3.2 * 5 + 0.4 * len(rows), 4.8))
    _dice_panel(axes[0], comparison, names)
    _bars(axes[1], names, [row.parameters / 1e6 for row in rows], "parameters (M)")
    _bars(axes[2], names, [row.seconds_per_iteration for row in rows], "seconds per training iteration")
    _bars(axes[3], names, [row.prediction_seconds_per_case for row in rows], "prediction seconds per case")
    _memory_panel(axes[4], comparison, names)
    fig.suptitle(f"{comparison.dataset}: trained models")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def _dice_panel(axis: Any, comparison: Comparison, names: list[str]) -> None:
    labels: list[str] = []
    for row in comparison.rows:
        labels += [name for name, _ in row.dice if name not in labels]
    width = 0.8 / max(len(labels), 1)
    for k, label in enumerate(labels):
        values = [dict(row.dice).get(label) for row in comparison.rows]
        xs = [i + (k - (len(labels) - 1) / 2) * width for i in range(len(names))]
        axis.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None],
                 width, label=label)
    axis.set_ylim(0, 1)
    axis.set_ylabel("Dice")
    axis.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    if labels:
        axis.legend(fontsize=7)


def _bars(axis: Any, names: list[str], values: list[float | None], title: str) -> None:
    axis.bar([i for i, v in enumerate(values) if v is not None], [v for v in values if v is not None])
    axis.set_ylabel(title)
    axis.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)


def _memory_panel(axis: Any, comparison: Comparison, names: list[str]) -> None:
    rows = comparison.rows
    xs = range(len(rows))
    axis.bar([x - 0.2 for x in xs], [row.estimated_memory_gib for row in rows], 0.4, label="estimated (GPU)")
    measured = [(x, row.peak_memory_gib) for x, row in zip(xs, rows) if row.peak_memory_gib is not None]
    kinds = sorted({row.memory_kind for row in rows if row.memory_kind})
    axis.bar([x + 0.2 for x, _ in measured], [v for _, v in measured], 0.4,
             label=f"measured peak ({', '.join(kinds) or 'none'})")
    axis.set_ylabel("training memory (GiB)")
    axis.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    axis.legend(fontsize=7)
