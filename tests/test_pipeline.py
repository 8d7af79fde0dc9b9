"""The whole pipeline through the command line on the synthetic example: plan -> ... -> evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from autoseg.cli import app
from autoseg.io.readers import read_label

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, f"{args}: {result.output}"
    return result.output


@pytest.mark.slow
def test_short_training_segments_held_out_scans(roots: Path) -> None:
    raw = roots / "raw" / "Dataset900_Example"
    _ok(["example-dataset", "--cases", "4", "--size", "32", "--seed", "1"])
    _ok(["plan", "900", "-j", "1"])
    _ok(["preprocess", "900", "-j", "1"])
    trained = _ok(["train", "900", "3d_fullres", "0", "--epochs", "4", "--iterations-per-epoch", "15",
                   "--val-iterations", "2", "-j", "0"])
    assert "organ" in trained  # the fold's validation table
    validation = roots / "results" / "Dataset900_Example" / "3d_fullres__autoseg" / "fold_0" / "validation"
    assert (validation / "summary.json").is_file() and list(validation.glob("*.npz"))
    _ok(["predict", "-i", str(raw / "imagesTs"), "-o", str(roots / "pred"), "-d", "900", "-c", "3d_fullres",
         "-f", "0", "--no-tta"])
    evaluated = _ok(["evaluate", str(roots / "pred"), str(raw / "labelsTs")])
    summary = json.loads((roots / "pred" / "summary.json").read_text())
    assert summary["mean"]["organ"]["dice"] > 0.5, evaluated
    assert len(summary["cases"]) == 2 and "organ" in evaluated
    assert (validation.parent / "training.json").is_file()  # the fold's own settings, for --continue
    assert "arithmetic: fp32 (--precision auto)" in (validation.parent / "training.log").read_text()  # conftest: fp32
    validated_at = (validation / "summary.json").stat().st_mtime_ns
    _ok(["train", "900", "3d_fullres", "0", "--continue", "-j", "0"])  # a resubmitted finished fold
    assert (validation / "summary.json").stat().st_mtime_ns == validated_at  # not validated again
    # the trained model travels as a zip and predicts the same labels elsewhere
    _ok(["export-model", "900", "-c", "3d_fullres", "-o", str(roots / "model.zip")])
    _ok(["predict", "-i", str(raw / "imagesTs"), "-o", str(roots / "pred_zip"), "-m", str(roots / "model.zip"),
         "--no-tta"])
    for path in sorted((roots / "pred").glob("*.nii.gz")):
        assert np.array_equal(read_label(path)[0], read_label(roots / "pred_zip" / path.name)[0]), path.name


def test_find_best_without_trained_models_is_a_clear_error(roots: Path) -> None:
    _ok(["example-dataset", "--cases", "3", "--size", "24"])
    result = runner.invoke(app, ["find-best", "900"])
    assert result.exit_code == 2 and "fix:" in result.output


def test_ensemble_needs_two_prediction_folders(roots: Path) -> None:
    (roots / "a").mkdir()
    result = runner.invoke(app, ["ensemble", "-i", str(roots / "a"), "-o", str(roots / "out")])
    assert result.exit_code == 2 and "error:" in result.output


def test_configurations_can_be_listed_as_in_nnunet(roots: Path) -> None:
    _ok(["example-dataset", "--cases", "3", "--size", "24"])
    _ok(["plan", "900", "-j", "1"])
    done = _ok(["preprocess", "900", "-c", "2d", "3d_fullres", "-j", "1"])
    assert "2d:" in done and "3d_fullres:" in done
    unknown = runner.invoke(app, ["preprocess", "900", "-c", "2d", "3d_highres"])
    assert unknown.exit_code == 2 and "3d_highres" in unknown.output
    listed = runner.invoke(app, ["find-best", "900", "-c", "2d", "3d_fullres"])
    assert listed.exit_code == 2 and "unexpected extra" not in listed.output
