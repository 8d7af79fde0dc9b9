"""progress.png: visible from the first epoch, one colour per class (issue 19)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from autoseg.training.progress import class_colours, plot_progress, progress_figure


def _records(epochs: int, classes: int) -> list[dict]:
    return [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 0.9 / (e + 1), "lr": 0.01, "epoch_seconds": 30.0,
             "ema_dice": 0.1 * e, "pseudo_dice": {f"class{c}": 0.01 * c for c in range(classes)}}
            for e in range(epochs)]


def test_one_epoch_draws_markers_and_many_epochs_draw_lines(tmp_path: Path) -> None:
    figure = progress_figure(_records(1, 2))
    lines = [line for axis in figure.axes for line in axis.get_lines()]
    assert lines and all(line.get_marker() == "o" for line in lines)  # one point per line: visible
    plt.close(figure)
    figure = progress_figure(_records(200, 2))
    assert all(line.get_marker() in (None, "None", "") for axis in figure.axes for line in axis.get_lines())
    plt.close(figure)
    plot_progress(_records(1, 2), tmp_path / "progress.png")
    assert (tmp_path / "progress.png").stat().st_size > 1000


def test_every_class_gets_its_own_colour() -> None:
    for count in (3, 11, 20, 105):
        colours = class_colours(count)
        assert len(set(colours)) == count
    figure = progress_figure(_records(3, 25))
    dice = [line for line in figure.axes[-1].get_lines() if line.get_label().startswith("dice ")]
    assert len(dice) == 25 and len({line.get_color() for line in dice}) == 25
    plt.close(figure)
