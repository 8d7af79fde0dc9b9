"""Overlay PNGs (issue 19, nnU-Net's plot_overlay_pngs): the busiest slice, labels coloured over the scan."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from typer.testing import CliRunner

from autoseg.cli import app
from autoseg.evaluation.overlay import busiest_slice, overlay_rgb


def test_the_slice_with_most_labels_is_chosen_and_coloured() -> None:
    labels = np.zeros((5, 8, 8), np.uint8)
    labels[3, 2:6, 2:6] = 2
    labels[1, 0, 0] = 1
    assert busiest_slice(labels) == 3 and busiest_slice(np.zeros((4, 2, 2))) == 2
    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    rgb = overlay_rgb(image, labels[3])
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    outside = rgb[0, 0]
    assert outside[0] == outside[1] == outside[2]  # grey where there is no label
    inside = rgb[3, 3].astype(int)
    assert len(set(inside.tolist())) > 1  # coloured where there is one


def test_overlay_command_writes_one_png_per_case(example_dataset: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["overlay", str(example_dataset / "imagesTr"), str(example_dataset / "labelsTr"),
                                      "-o", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    pictures = sorted((tmp_path / "png").glob("*.png"))
    labels = sorted((example_dataset / "labelsTr").iterdir())
    assert len(pictures) == len(labels) and pictures
    picture = plt.imread(pictures[0])
    assert picture.ndim == 3 and picture.shape[2] in (3, 4)
    empty = CliRunner().invoke(app, ["overlay", str(tmp_path / "png"), str(example_dataset / "labelsTr"), "-o",
                                     str(tmp_path / "none")])
    assert empty.exit_code == 2 and "no case has both" in empty.output
