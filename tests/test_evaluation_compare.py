"""`autoseg compare`: every trained model folder side by side, read from what training and validation record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_planning import hippocampus
from typer.testing import CliRunner

from autoseg.cli import app
from autoseg.evaluation.compare import Comparison, compare, markdown_table, table_rows, write_comparison
from autoseg.evaluation.contract import EvaluationSettings, EvaluationSummary, LabelMean
from autoseg.model_folder import ModelFolder
from autoseg.planning import plan
from autoseg.serialization import load_contract, save_contract, write_json

DATASET = "Dataset004_Hippocampus"


def _summary(path: Path, dice: dict[str, tuple[float | None, int]]) -> None:
    """summary.json with the given (mean Dice, cases defining the label) per label, 4 cases evaluated."""
    mean = {name: LabelMean(dice=d, iou=None, hd95=None, nsd=None, n_cases=4, n_defined=n)
            for name, (d, n) in dice.items()}
    defined = [d for d, _ in dice.values() if d is not None]
    save_contract(path, EvaluationSummary(cases=(), mean=mean, foreground_mean=sum(defined) / len(defined),
                                          settings=EvaluationSettings(distances=False, tolerance_mm=1.0)))


def _fold(folder: ModelFolder, fold: int, records: list[dict], *, timing: tuple[float, int] | None,
          dice: dict[str, tuple[float | None, int]] | None, finished: bool = True) -> None:
    fold_dir = folder.fold_dir(fold)
    (fold_dir / "validation").mkdir(parents=True)
    if finished:
        folder.checkpoint(fold, "final").write_bytes(b"")
    (fold_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_json(folder.fold_settings_file(fold), {"iterations_per_epoch": 10})
    if timing is not None:
        write_json(fold_dir / "validation" / "timing.json", {"cases": timing[1], "seconds": timing[0]})
    if dice is not None:
        _summary(fold_dir / "validation" / "summary.json", dice)


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    """unet: two finished folds with every record; enet: one finished fold with an old-style record (no
    train_seconds, no memory) and an unfinished fold; resenc: nothing finished."""
    root = tmp_path / DATASET
    for network in ("unet", "enet", "resenc"):
        plans = plan(*hippocampus(), network=network)
        identifier = "autoseg" if network == "unet" else network
        save_contract(root / f"3d_fullres__{identifier}" / "plans.json", plans)
    unet = ModelFolder(root / "3d_fullres__autoseg")
    record = {"iterations": 10, "epoch_seconds": 30.0, "memory_kind": "cpu_rss"}
    _fold(unet, 0, [{**record, "train_seconds": 20.0, "peak_memory_gib": 3.0},
                    {**record, "train_seconds": 24.0, "peak_memory_gib": 3.5}],
          timing=(12.0, 3), dice={"anterior": (0.8, 3), "posterior": (0.7, 3)})
    _fold(unet, 1, [{**record, "train_seconds": 26.0, "peak_memory_gib": 3.2}],
          timing=(4.0, 1), dice={"anterior": (0.6, 1), "posterior": (None, 0)})
    enet = ModelFolder(root / "3d_fullres__enet")
    _fold(enet, 0, [{"epoch_seconds": 15.0}], timing=None, dice=None)
    _fold(enet, 1, [{"epoch_seconds": 99.0}], timing=None, dice=None, finished=False)
    _fold(ModelFolder(root / "3d_fullres__resenc"), 0, [], timing=None, dice=None, finished=False)
    return root


def test_each_finished_model_folder_is_one_row_read_from_its_records(results: Path) -> None:
    comparison = compare(results)
    assert [row.model for row in comparison.rows] == ["3d_fullres__autoseg", "3d_fullres__enet"]
    unet, enet = comparison.rows
    expected = plan(*hippocampus(), network="unet").configurations["3d_fullres"]
    assert (unet.network, unet.folds, unet.parameters) == ("unet", ("0", "1"), expected.parameter_count)
    assert unet.receptive_field == expected.receptive_field
    assert unet.estimated_memory_gib == expected.estimated_memory_gb
    assert unet.seconds_per_iteration == pytest.approx(2.4)  # median of 2.0, 2.4, 2.6: steps only
    assert unet.prediction_seconds_per_case == pytest.approx(16.0 / 4)  # pooled over the folds' cases
    assert (unet.peak_memory_gib, unet.memory_kind) == (3.5, "cpu_rss")
    dice = dict(unet.dice)  # label means weighted by the cases that define them
    assert dice["anterior"] == pytest.approx((0.8 * 3 + 0.6) / 4) and dice["posterior"] == pytest.approx(0.7)
    assert unet.dice_source == "fold validation" and unet.mean_dice == pytest.approx((0.75 + 0.7) / 2)
    assert (enet.network, enet.folds) == ("enet", ("0",))
    assert enet.seconds_per_iteration == pytest.approx(1.5)  # old record: epoch seconds / training.json's iterations
    assert enet.prediction_seconds_per_case is None and enet.peak_memory_gib is None
    assert enet.dice == () and enet.dice_source == "none" and enet.mean_dice is None


def test_find_best_cross_validation_is_preferred_when_it_exists(results: Path) -> None:
    crossval = results / "crossval" / "3d_fullres__autoseg"
    crossval.mkdir(parents=True)
    _summary(crossval / "summary.json", {"anterior": (0.9, 4), "posterior": (0.85, 4)})
    unet = compare(results).rows[0]
    assert unet.dice == (("anterior", 0.9), ("posterior", 0.85)) and unet.dice_source == "cross-validation"


def test_written_table_figure_and_contract(results: Path) -> None:
    comparison = write_comparison(results)
    assert load_contract(results / "comparison.json", Comparison, rerun="autoseg compare") == comparison
    text = (results / "comparison.md").read_text()
    assert "| 3d_fullres__autoseg | unet | 0,1 | 0.750 | 0.700 | 0.725 |" in text
    assert "| 3d_fullres__enet | enet | 0 | - | - | - |" in text and "cpu_rss" in text
    assert (results / "comparison.png").stat().st_size > 5000
    header = table_rows(comparison)[0]
    assert all(len(row) == len(header) for row in table_rows(comparison))


def test_nothing_trained_gives_an_empty_comparison_and_a_clear_command_error(roots: Path) -> None:
    empty = compare(roots / "nowhere")
    assert empty.rows == () and "No model folder" in markdown_table(empty)
    (roots / "raw" / DATASET).mkdir(parents=True)
    result = CliRunner().invoke(app, ["compare", DATASET])
    assert result.exit_code != 0 and "no trained model folder" in result.output
    assert f"autoseg train {DATASET} 3d_fullres 0" in result.output


def test_command_prints_the_table_and_where_it_wrote_it(results: Path, roots: Path, monkeypatch) -> None:
    monkeypatch.setenv("AUTOSEG_RESULTS", str(results.parent))
    (roots / "raw" / DATASET).mkdir(parents=True)
    result = CliRunner().invoke(app, ["compare", DATASET], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "3d_fullres__enet" in result.output and "comparison.png" in result.output
    assert (results / "comparison.md").is_file()
