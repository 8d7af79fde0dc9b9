"""evaluate_arrays on label maps, evaluate_folder on NIfTI files, summary.json and its table rows."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from autoseg.dataset import LabelDef, load_dataset
from autoseg.evaluation import (
    CaseEvaluation,
    EvaluationError,
    EvaluationSettings,
    EvaluationSummary,
    evaluate_arrays,
    evaluate_folder,
    load_summary,
    summarize,
    summary_rows,
)
from autoseg.io import Geometry, write_label
from autoseg.serialization import load_contract, save_contract

LABELS = (LabelDef("liver", (1,)), LabelDef("tumour", (2,)), LabelDef("whole", (1, 2)))
GEOMETRY = Geometry(shape=(6, 8, 10), file_spacing=(0.5, 1.0, 2.0), origin=(0.0, 0.0, 0.0),
                    direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
SPACING = (2.0, 1.0, 0.5)  # array order (z, y, x)


def _case(seed: int) -> np.ndarray:
    """A label map of shape (6, 8, 10): a liver box with a tumour inside, moved a little per seed."""
    array = np.zeros(GEOMETRY.shape, dtype=np.uint8)
    z, y = 1 + seed % 2, 2 + seed % 3
    array[z : z + 3, y : y + 4, 2:8] = 1
    array[z + 1, y + 1 : y + 3, 4:6] = 2
    return array


def test_plain_and_region_labels_by_hand() -> None:
    ref = np.array([[[0, 1, 1, 2, 2, 2]]])
    pred = np.array([[[1, 1, 2, 2, 0, 0]]])
    liver, tumour, whole = evaluate_arrays(pred, ref, LABELS, spacing=(1.0, 1.0, 2.0))
    assert (liver.tp, liver.fp, liver.fn, liver.tn) == (1, 1, 1, 3)
    assert liver.dice == pytest.approx(0.5) and liver.iou == pytest.approx(1 / 3)
    assert (tumour.tp, tumour.fp, tumour.fn, tumour.tn) == (1, 1, 2, 2)
    assert whole.values == (1, 2) and (whole.tp, whole.fp, whole.fn, whole.tn) == (3, 1, 2, 0)
    assert whole.dice == pytest.approx(2 / 3)
    assert whole.volume_pred_mm3 == pytest.approx(8.0) and whole.volume_ref_mm3 == pytest.approx(10.0)
    assert liver.hd95 is None and liver.nsd is None  # distances off by default


def test_ignore_label_is_excluded_from_every_metric() -> None:
    ref = np.array([[[1, 1, 9, 9, 0, 0]]])
    pred = np.array([[[1, 1, 1, 0, 1, 0]]])
    (liver,) = evaluate_arrays(pred, ref, LABELS[:1], spacing=(1.0, 1.0, 1.0), ignore_label=9)
    assert (liver.tp, liver.fp, liver.fn, liver.tn) == (2, 1, 0, 1)
    assert liver.volume_pred_mm3 == pytest.approx(3.0)


def test_distances_and_not_defined_values() -> None:
    ref = _case(0)
    pred = np.where(ref == 2, 1, ref)  # the tumour is missed
    liver, tumour, whole = evaluate_arrays(pred, ref, LABELS, spacing=SPACING, distances=True)
    assert whole.dice == 1.0 and whole.hd95 == 0.0 and whole.nsd == 1.0
    assert tumour.dice == 0.0 and tumour.nsd == 0.0
    assert tumour.hd95 == pytest.approx(math.sqrt(12**2 + 8**2 + 5**2))  # image diagonal
    empty = np.zeros_like(ref)
    assert all(m.dice is None and m.hd95 is None and m.nsd is None
               for m in evaluate_arrays(empty, empty, LABELS, spacing=SPACING, distances=True))


def test_shape_mismatch_of_arrays_is_an_evaluation_error() -> None:
    with pytest.raises(EvaluationError, match="shape"):
        evaluate_arrays(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), LABELS, spacing=SPACING)


def _write_folders(root: Path, cases: dict[str, np.ndarray], predictions: dict[str, np.ndarray]) -> tuple[Path, Path]:
    for folder, arrays in (("ref", cases), ("pred", predictions)):
        for case_id, array in arrays.items():
            write_label(array, GEOMETRY, root / folder / f"{case_id}.nii.gz")
    return root / "pred", root / "ref"


def test_evaluate_folder_writes_a_summary_that_round_trips(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    refs = {f"case_{i}": _case(i) for i in range(3)}
    preds = {"case_0": refs["case_0"], "case_1": np.where(refs["case_1"] == 2, 0, refs["case_1"])}
    pred_dir, ref_dir = _write_folders(tmp_path, refs, preds)
    with caplog.at_level(logging.WARNING, logger="autoseg.evaluation"):
        summary = evaluate_folder(pred_dir, ref_dir, LABELS, file_ending=".nii.gz", distances=True)
    assert "case_2" in caplog.text and summary.missing_predictions == ("case_2",)
    assert [case.case_id for case in summary.cases] == ["case_0", "case_1"]
    assert summary.cases[0].label("liver").volume_ref_mm3 == pytest.approx(np.sum(refs["case_0"] == 1) * 1.0)
    assert summary.mean["liver"].dice == pytest.approx(1.0)
    assert summary.mean["tumour"].dice == pytest.approx(0.5) and summary.mean["tumour"].n_defined == 2
    assert summary.foreground_mean == pytest.approx(np.mean([m.dice for m in summary.mean.values()]))
    assert summary.settings == EvaluationSettings(distances=True, tolerance_mm=1.0)
    assert load_summary(pred_dir / "summary.json") == summary


def test_workers_give_the_same_summary(tmp_path: Path) -> None:
    refs = {f"case_{i}": _case(i) for i in range(4)}
    preds = {k: np.roll(v, 1, axis=2) for k, v in refs.items()}
    pred_dir, ref_dir = _write_folders(tmp_path, refs, preds)
    serial = evaluate_folder(pred_dir, ref_dir, LABELS, file_ending=".nii.gz", distances=True,
                             output=tmp_path / "serial.json")
    parallel = evaluate_folder(pred_dir, ref_dir, LABELS, file_ending=".nii.gz", distances=True, workers=2,
                               output=tmp_path / "parallel.json")
    assert parallel == serial
    assert not (pred_dir / "summary.json").exists()


def test_not_defined_values_round_trip_as_none(tmp_path: Path) -> None:
    empty = np.zeros((2, 3, 4), dtype=np.uint8)
    case = CaseEvaluation("c", "p", "r", evaluate_arrays(empty, empty, LABELS, spacing=SPACING, distances=True))
    summary = summarize([case], EvaluationSettings(distances=True, tolerance_mm=2.0, ignore_label=5))
    assert summary.mean["liver"].dice is None and summary.mean["liver"].n_empty == 1
    assert summary.foreground_mean is None
    save_contract(tmp_path / "s.json", summary)
    assert load_contract(tmp_path / "s.json", EvaluationSummary, rerun="x") == summary
    assert "NaN" not in (tmp_path / "s.json").read_text()


def test_prediction_without_reference_is_an_error(tmp_path: Path) -> None:
    pred_dir, ref_dir = _write_folders(tmp_path, {"case_0": _case(0)}, {"case_0": _case(0), "stray": _case(1)})
    with pytest.raises(EvaluationError, match="no reference") as info:
        evaluate_folder(pred_dir, ref_dir, LABELS, file_ending=".nii.gz")
    assert info.value.path == str(pred_dir / "stray.nii.gz") and info.value.hint


def test_shape_mismatch_names_the_prediction(tmp_path: Path) -> None:
    pred_dir, ref_dir = _write_folders(tmp_path, {"case_0": _case(0)}, {})
    small = Geometry(shape=(6, 8, 9), file_spacing=GEOMETRY.file_spacing, origin=GEOMETRY.origin,
                     direction=GEOMETRY.direction)
    write_label(_case(0)[..., :9], small, pred_dir / "case_0.nii.gz")
    with pytest.raises(EvaluationError, match="shape") as info:
        evaluate_folder(pred_dir, ref_dir, LABELS, file_ending=".nii.gz")
    assert info.value.path == str(pred_dir / "case_0.nii.gz")


def test_no_pairs_is_an_error(tmp_path: Path) -> None:
    pred_dir, ref_dir = _write_folders(tmp_path, {"case_0": _case(0)}, {})
    pred_dir.mkdir()
    with pytest.raises(EvaluationError, match="no prediction files"):
        evaluate_folder(pred_dir, ref_dir, LABELS, file_ending=".nii.gz")
    with pytest.raises(EvaluationError, match="folder not found"):
        evaluate_folder(tmp_path / "nowhere", ref_dir, LABELS, file_ending=".nii.gz")


def test_summary_rows_make_a_table() -> None:
    ref = _case(0)
    case = CaseEvaluation("c", "p", "r", evaluate_arrays(ref, ref, LABELS, spacing=SPACING))
    rows = summary_rows(summarize([case], EvaluationSettings(distances=False, tolerance_mm=2.0)))
    assert rows[0] == ("label", "Dice", "IoU", "HD95 mm", "NSD@2mm", "n")
    assert rows[1] == ("liver", "1.0000", "1.0000", "-", "-", "1/1")
    assert rows[-1][0] == "mean" and len(rows) == len(LABELS) + 2
    assert {len(row) for row in rows} == {6}


@pytest.mark.realdata
def test_real_labels_against_themselves(real_dataset: Path, tmp_path: Path) -> None:
    dataset = load_dataset(real_dataset)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    for case in dataset.cases[:3]:
        assert case.label is not None
        shutil.copy(case.label, pred_dir)
    summary = evaluate_folder(pred_dir, real_dataset / "labelsTr", dataset.foreground_labels,
                              file_ending=dataset.file_ending, distances=True, workers=2)
    assert len(summary.cases) == 3 and len(summary.missing_predictions) == dataset.num_training - 3
    for case in summary.cases:
        assert all(m.dice == 1.0 and m.hd95 == 0.0 and m.nsd == 1.0 for m in case.metrics)
    assert summary.foreground_mean == 1.0
