"""Ensembling prediction folders (mean probabilities -> labels) and largest-component postprocessing."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from autoseg.dataset.contract import LabelDef
from autoseg.errors import FormatVersionError
from autoseg.inference.ensemble import EnsembleError, ensemble_folders, load_probabilities
from autoseg.inference.info import PredictionInfo, read_prediction_info, write_prediction_info
from autoseg.inference.postprocess import (
    ComponentRule,
    PostprocessingError,
    PostprocessingRules,
    apply_rules,
    keep_largest_component,
    load_rules,
    postprocess_folder,
    save_rules,
)
from autoseg.inference.run import save_probabilities_file
from autoseg.io.geometry import Geometry
from autoseg.io.readers import read_header, read_label, write_label
from autoseg.serialization import read_json, write_json

SHAPE = (4, 5, 6)
PLAIN = (LabelDef("background", (0,)), LabelDef("a", (1,)), LabelDef("b", (2,)))
REGIONS = (LabelDef("background", (0,)), LabelDef("whole", (1, 2)), LabelDef("core", (2,)))


def _geometry(origin: float = 0.0) -> Geometry:
    return Geometry(shape=SHAPE, file_spacing=(1.0, 1.5, 2.0), origin=(origin, 0.0, 0.0),
                    direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def _prediction_folder(folder: Path, cases: dict[str, np.ndarray], *, labels: tuple[LabelDef, ...] = PLAIN,
                       region_values: tuple[int, ...] | None = None, origin: float = 0.0,
                       npz: bool = True) -> Path:
    """A folder as `autoseg predict --save-probabilities` writes it (the label file is a placeholder)."""
    folder.mkdir(parents=True)
    write_prediction_info(folder, PredictionInfo(labels=labels, region_values=region_values,
                                                 sources=(str(folder),), folds=("0",), probabilities=npz))
    for case_id, probabilities in cases.items():
        write_label(np.zeros(SHAPE, np.uint8), _geometry(origin), folder / f"{case_id}.nii.gz")
        if npz:
            save_probabilities_file(folder / f"{case_id}.npz", probabilities)
    return folder


def _softmax(seed: int, channels: int = 3) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(channels, *SHAPE)) * 3
    exp = np.exp(logits - logits.max(axis=0))
    return (exp / exp.sum(axis=0)).astype(np.float32)


def test_ensemble_is_the_argmax_of_the_mean(tmp_path: Path) -> None:
    a = _prediction_folder(tmp_path / "a", {"c0": _softmax(0), "c1": _softmax(1)})
    b = _prediction_folder(tmp_path / "b", {"c0": _softmax(2), "c1": _softmax(3)}, origin=50.0)
    written = ensemble_folders([a, b], tmp_path / "out", save_probabilities=True, workers=2)
    assert written == ["c0", "c1"]
    for case_id in written:
        mean = (load_probabilities(a / f"{case_id}.npz").astype(np.float32)
                + load_probabilities(b / f"{case_id}.npz").astype(np.float32)) / 2
        labels, geometry = read_label(tmp_path / "out" / f"{case_id}.nii.gz")
        assert np.array_equal(labels, mean.argmax(axis=0))
        assert geometry == read_header(a / f"{case_id}.nii.gz")[0]  # the first input's geometry
        np.testing.assert_allclose(load_probabilities(tmp_path / "out" / f"{case_id}.npz"), mean, atol=1e-3)
    info = read_prediction_info(tmp_path / "out")
    assert info.sources == (str(a.resolve()), str(b.resolve()))
    assert info.labels == PLAIN and info.probabilities


def test_region_ensembles_threshold_each_region_in_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    sigmoids = {name: rng.uniform(size=(2, *SHAPE)).astype(np.float32) for name in ("a", "b")}
    folders = [_prediction_folder(tmp_path / name, {"c0": probabilities}, labels=REGIONS, region_values=(1, 2))
               for name, probabilities in sigmoids.items()]
    ensemble_folders(folders, tmp_path / "out")
    mean = sum(load_probabilities(folder / "c0.npz").astype(np.float32) for folder in folders) / 2
    expected = np.zeros(SHAPE, np.uint8)
    expected[mean[0] > 0.5] = 1
    expected[mean[1] > 0.5] = 2  # the nested region is written last
    assert np.array_equal(read_label(tmp_path / "out" / "c0.nii.gz")[0], expected)
    assert read_prediction_info(tmp_path / "out").region_values == (1, 2)


def test_inputs_with_other_labels_are_refused_naming_the_folder(tmp_path: Path) -> None:
    a = _prediction_folder(tmp_path / "a", {"c0": _softmax(0)})
    b = _prediction_folder(tmp_path / "b", {"c0": _softmax(1, channels=2)}, labels=PLAIN[:2])
    with pytest.raises(EnsembleError, match="labels differ") as err:
        ensemble_folders([a, b], tmp_path / "out")
    assert err.value.path == str(b)


def test_folders_without_probabilities_or_info_are_refused(tmp_path: Path) -> None:
    a = _prediction_folder(tmp_path / "a", {"c0": _softmax(0)})
    b = _prediction_folder(tmp_path / "b", {"c0": _softmax(1)}, npz=False)
    with pytest.raises(EnsembleError, match="no probabilities") as err:
        ensemble_folders([a, b], tmp_path / "out")
    assert err.value.path == str(b) and "--save-probabilities" in err.value.hint
    (b / "prediction.json").unlink()
    with pytest.raises(EnsembleError, match="prediction.json") as err:
        ensemble_folders([a, b], tmp_path / "out")
    assert err.value.path == str(b) and "--save-probabilities" in err.value.hint
    with pytest.raises(EnsembleError, match="at least two"):
        ensemble_folders([a], tmp_path / "out")


def test_only_common_cases_are_ensembled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = _prediction_folder(tmp_path / "a", {"c0": _softmax(0), "c1": _softmax(1)})
    b = _prediction_folder(tmp_path / "b", {"c1": _softmax(2), "c2": _softmax(3)})
    with caplog.at_level(logging.WARNING, logger="autoseg"):
        assert ensemble_folders([a, b], tmp_path / "out") == ["c1"]
    assert "c0" in caplog.text and "c2" in caplog.text
    c = _prediction_folder(tmp_path / "c", {"c9": _softmax(4)})
    with pytest.raises(EnsembleError, match="no case in common"):
        ensemble_folders([a, c], tmp_path / "out2")


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path: Path) -> None:
    a = _prediction_folder(tmp_path / "a", {"c0": _softmax(0), "c1": _softmax(1)})
    b = _prediction_folder(tmp_path / "b", {"c0": _softmax(2), "c1": _softmax(3)})
    assert ensemble_folders([a, b], tmp_path / "out") == ["c0", "c1"]
    assert ensemble_folders([a, b], tmp_path / "out") == []
    assert ensemble_folders([a, b], tmp_path / "out", save_probabilities=True) == ["c0", "c1"]  # npz missing
    assert ensemble_folders([a, b], tmp_path / "out", overwrite=True) == ["c0", "c1"]


def _islands() -> np.ndarray:
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[1:6, 1:6, 1:6] = 1  # 125 voxels
    labels[1:6, 1:6, 6:8] = 2  # 50 voxels touching the first blob
    labels[9:11, 9:11, 9:11] = 1  # an 8-voxel island of label 1
    labels[6, 6, 8] = 2  # a voxel of label 2 touching the label-2 block at one corner only
    labels[10, 1, 10] = 2  # an isolated voxel of label 2
    return labels


def test_keep_largest_component_of_all_foreground(tmp_path: Path) -> None:
    labels = _islands()
    out = keep_largest_component(labels, (1, 2))
    expected = labels.copy()
    expected[9:11, 9:11, 9:11] = 0
    expected[10, 1, 10] = 0  # the diagonal neighbour stays: full (26-) connectivity
    assert np.array_equal(out, expected)
    assert labels[10, 1, 10] == 2  # the input is not modified
    assert np.array_equal(keep_largest_component(np.zeros((3, 3, 3), np.uint8), (1,)), np.zeros((3, 3, 3)))


def test_a_label_group_is_filtered_on_its_own() -> None:
    labels = _islands()
    out = keep_largest_component(labels, (2,))  # label 2 alone: the block (and its corner voxel) wins
    assert out[10, 1, 10] == 0 and out[6, 6, 8] == 2 and out[9, 9, 9] == 1 and (out == 2).sum() == 51
    rules = PostprocessingRules((ComponentRule("all foreground", (1, 2)), ComponentRule("b", (2,))))
    out = apply_rules(labels, rules)
    assert out[9, 9, 9] == 0 and out[10, 1, 10] == 0 and (out == 1).sum() == 125 and (out == 2).sum() == 51
    tied = np.zeros((1, 5, 5), np.uint8)
    tied[0, 0, 0] = tied[0, 4, 4] = 1  # two components of the largest size are both kept
    assert np.array_equal(keep_largest_component(tied, (1,)), tied)


def test_rules_round_trip_and_refuse_other_formats(tmp_path: Path) -> None:
    rules = PostprocessingRules((ComponentRule("all foreground", (1, 2)), ComponentRule("core", (2,))),
                                decided_on="/r/crossval/x")
    save_rules(tmp_path / "postprocessing.json", rules)
    assert load_rules(tmp_path / "postprocessing.json") == rules
    assert "then core" in rules.describe() and PostprocessingRules().describe() == "no postprocessing"
    data = read_json(tmp_path / "postprocessing.json")
    write_json(tmp_path / "old.json", {**data, "format": 0})
    with pytest.raises(FormatVersionError):
        load_rules(tmp_path / "old.json")
    with pytest.raises(PostprocessingError, match="not found"):
        load_rules(tmp_path / "missing.json")


def test_postprocess_folder_keeps_geometry_and_info(tmp_path: Path) -> None:
    source = tmp_path / "pred"
    geometry = Geometry(shape=(12, 12, 12), file_spacing=(0.5, 0.75, 2.0), origin=(3.0, 4.0, 5.0),
                        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    write_label(_islands(), geometry, source / "c0.nii.gz")
    write_prediction_info(source, PredictionInfo(labels=PLAIN, region_values=None, sources=("m",), folds=("0",),
                                                 probabilities=True))
    rules = PostprocessingRules((ComponentRule("a", (1,)),))
    assert postprocess_folder(source, tmp_path / "pp", rules, file_ending=".nii.gz") == ["c0"]
    labels, written = read_label(tmp_path / "pp" / "c0.nii.gz")
    assert np.array_equal(labels, apply_rules(_islands(), rules)) and written == geometry
    info = read_prediction_info(tmp_path / "pp")
    assert info.labels == PLAIN and not info.probabilities
    assert postprocess_folder(source, tmp_path / "pp", rules, file_ending=".nii.gz") == []
    assert postprocess_folder(source, tmp_path / "pp", rules, file_ending=".nii.gz", overwrite=True) == ["c0"]
    with pytest.raises(PostprocessingError, match="is the input"):
        postprocess_folder(source, source, rules, file_ending=".nii.gz")
