"""Choosing the best setup on a fake results tree: configurations, pair ensembles, postprocessing, caching."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from autoseg.dataset.contract import LabelDef
from autoseg.evaluation import EvaluationError, load_summary
from autoseg.evaluation.find_best import BestChoice, collect_cross_validation, find_best, load_best
from autoseg.inference.info import PredictionInfo, read_prediction_info, write_prediction_info
from autoseg.inference.postprocess import load_rules
from autoseg.inference.run import save_probabilities_file
from autoseg.io.geometry import Geometry
from autoseg.io.readers import read_label, write_label
from autoseg.serialization import write_json

DATASET = "Dataset001_Fake"
LABELS = (LabelDef("background", (0,)), LabelDef("a", (1,)), LabelDef("b", (2,)))
SPLITS = [{"train": ["c2", "c3"], "val": ["c0", "c1"]}, {"train": ["c0", "c1"], "val": ["c2", "c3"]}]
GEOMETRY = Geometry(shape=(20, 20, 20), file_spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                    direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
ENDING = ".nii.gz"
WORSE, BETTER = "2d__autoseg", "3d_fullres__autoseg"


def _reference(index: int, *, separated: bool) -> np.ndarray:
    """Label a: an 8^3 block; label b: an 8x8x4 block touching it (or apart from it)."""
    labels = np.zeros(GEOMETRY.shape, np.uint8)
    z = slice(3 + index % 3, 11 + index % 3)
    labels[z, 4:12, 4:12] = 1
    labels[z, 4:12, 14:18] = 2 if separated else 0
    if not separated:
        labels[z, 4:12, 12:16] = 2
    return labels


def _probabilities(reference: np.ndarray, error: tuple[slice, ...] | None, true_class: int) -> np.ndarray:
    """Confident one-hot of the reference, except an unsure miss (background 0.55) in `error`, plus a
    confident 27-voxel island of label a that only postprocessing removes."""
    probabilities = np.eye(3, dtype=np.float32)[reference].transpose(3, 0, 1, 2) * 0.85 + 0.05
    if error is not None:
        box = probabilities[(slice(None), *error)]
        box[...] = 0.0
        box[0], box[true_class] = 0.55, 0.45
    probabilities[:, 16:19, 16:19, 16:19] = np.array([0.05, 0.9, 0.05])[:, None, None, None]
    return probabilities


def _model_folder(results: Path, name: str, references: dict[str, np.ndarray], *, npz: bool = True) -> None:
    """`name` misses half of label a's block (2d) or a quarter of label b's (3d_fullres), with an island."""
    root = results / name
    write_json(root / "splits.json", SPLITS)
    for fold, split in enumerate(SPLITS):
        folder = root / f"fold_{fold}" / "validation"
        folder.mkdir(parents=True)
        write_prediction_info(folder, PredictionInfo(labels=LABELS, region_values=None, sources=(str(root),),
                                                     folds=(str(fold),), probabilities=npz))
        for case_id in split["val"]:
            reference = references[case_id]
            z0 = int(np.argwhere(reference == 1)[:, 0].min())
            if name == WORSE:
                probabilities = _probabilities(reference, (slice(z0, z0 + 4), slice(4, 12), slice(4, 12)), 1)
            elif name == BETTER:
                probabilities = _probabilities(reference, (slice(z0, z0 + 2), slice(4, 12), slice(12, 16)), 2)
            else:
                probabilities = _probabilities(reference, None, 0)
            write_label(probabilities.argmax(axis=0).astype(np.uint8), GEOMETRY, folder / f"{case_id}{ENDING}")
            if npz:
                save_probabilities_file(folder / f"{case_id}.npz", probabilities)


def _tree(tmp_path: Path, configurations: tuple[str, ...] = (WORSE, BETTER), *, separated: bool = False,
          without_npz: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """(<results>/<dataset>, labelsTr) with 4 cases of 20^3 voxels and two folds per configuration."""
    references = {f"c{i}": _reference(i, separated=separated) for i in range(4)}
    labels_tr = tmp_path / "raw" / DATASET / "labelsTr"
    for case_id, reference in references.items():
        write_label(reference, GEOMETRY, labels_tr / f"{case_id}{ENDING}")
    results = tmp_path / "results" / DATASET
    for name in configurations:
        _model_folder(results, name, references, npz=name not in without_npz)
    return results, labels_tr


def _find_best(results: Path, labels_tr: Path, **kwargs: Any) -> BestChoice:
    return find_best(results, labels_tr, LABELS, file_ending=ENDING, **kwargs)


def test_an_ensemble_wins_and_postprocessing_removes_the_islands(tmp_path: Path) -> None:
    results, labels_tr = _tree(tmp_path)
    choice = _find_best(results, labels_tr)
    scores = {c.name: c.dice for c in choice.candidates}
    ensemble = f"ensemble__{WORSE}__{BETTER}"
    assert list(scores) == [WORSE, BETTER, ensemble]
    assert scores[WORSE] < scores[BETTER] < scores[ensemble] < 1.0
    assert choice.chosen == (WORSE, BETTER) and choice.chosen_name == ensemble
    assert choice.postprocessing_steps == ("all foreground",)  # then a and b alone change nothing: not kept
    assert choice.dice_before_postprocessing == scores[ensemble] and choice.dice_after_postprocessing == 1.0
    assert load_best(results / "best.json") == choice
    rules = load_rules(results / "postprocessing.json")
    assert [rule.values for rule in rules.keep_largest] == [(1, 2)]
    crossval = results / "crossval"
    for name in (WORSE, BETTER, ensemble, f"{ensemble}__postprocessed"):
        assert (crossval / name / "summary.json").is_file()
        assert sorted(p.name for p in (crossval / name).glob(f"*{ENDING}")) == [f"c{i}{ENDING}" for i in range(4)]
    assert load_summary(crossval / f"{ensemble}__postprocessed" / "summary.json").foreground_mean == 1.0
    assert read_prediction_info(crossval / WORSE).folds == ("0", "1")
    text = (results / "inference_instructions.txt").read_text()
    assert f"autoseg predict -i INPUT -o OUT_A -d {DATASET} -c 2d --plans autoseg --save-probabilities\n" in text
    assert f"autoseg predict -i INPUT -o OUT_B -d {DATASET} -c 3d_fullres --plans autoseg --save-probabilities\n" \
        in text
    assert "autoseg ensemble -i OUT_A OUT_B -o OUTPUT\n" in text
    assert f"autoseg postprocess -i OUTPUT -o OUTPUT_PP --rules {(results / 'postprocessing.json').resolve()}\n" \
        in text


def test_a_rerun_reuses_summaries_and_redoes_what_changed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    results, labels_tr = _tree(tmp_path)
    first = _find_best(results, labels_tr)
    summaries = sorted((results / "crossval").glob("*/summary.json"))
    assert len(summaries) == 4
    before = {path: path.stat().st_mtime_ns for path in summaries}
    with caplog.at_level(logging.INFO, logger="autoseg"):
        assert _find_best(results, labels_tr) == first
    assert {path: path.stat().st_mtime_ns for path in summaries} == before
    assert caplog.text.count("inputs unchanged") == 4
    changed = results / BETTER / "fold_1" / "validation" / f"c3{ENDING}"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    _find_best(results, labels_tr)
    redone = {path for path in summaries if path.stat().st_mtime_ns != before[path]}
    assert {path.parent.name for path in redone} == {BETTER, f"ensemble__{WORSE}__{BETTER}",
                                                     f"ensemble__{WORSE}__{BETTER}__postprocessed"}


def test_single_configuration_without_probabilities_and_per_label_rules(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    results, labels_tr = _tree(tmp_path, (WORSE, "3d_lowres__autoseg"), separated=True, without_npz=(WORSE,))
    with caplog.at_level(logging.INFO, logger="autoseg"):
        choice = _find_best(results, labels_tr)
    assert "no ensemble of" in caplog.text
    assert [c.name for c in choice.candidates] == [WORSE, "3d_lowres__autoseg"]
    assert choice.chosen == ("3d_lowres__autoseg",)
    # all foreground as one would drop label b's block (the smaller one): rejected; label a alone helps
    assert choice.postprocessing_steps == ("a",) and choice.dice_after_postprocessing == 1.0
    text = (results / "inference_instructions.txt").read_text()
    assert f"autoseg predict -i INPUT -o OUTPUT -d {DATASET} -c 3d_lowres --plans autoseg\n" in text
    assert "ensemble -i" not in text and "--save-probabilities" not in text
    post = read_label(results / "crossval" / "3d_lowres__autoseg__postprocessed" / f"c0{ENDING}")[0]
    assert post[17, 17, 17] == 0 and (post == 2).sum() == 256
    assert _find_best(results, labels_tr, allow_ensembles=False, configurations=["3d_lowres"]).candidates == \
        choice.candidates[1:]


def test_a_missing_fold_names_the_fold_and_the_fix(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    results, labels_tr = _tree(tmp_path)
    for path in (results / WORSE / "fold_1" / "validation").iterdir():
        path.unlink()
    (results / WORSE / "fold_1" / "validation").rmdir()
    with pytest.raises(EvaluationError, match="fold 1") as err:
        collect_cross_validation(results / WORSE, tmp_path / "cv")
    assert err.value.hint.endswith(f"autoseg train {DATASET} 2d 1")
    with pytest.raises(EvaluationError, match="fold 1"):
        _find_best(results, labels_tr, configurations=[WORSE])
    with caplog.at_level(logging.INFO, logger="autoseg"):
        choice = _find_best(results, labels_tr)  # by default, incomplete configurations are left out
    assert [c.name for c in choice.candidates] == [BETTER] and "not a candidate" in caplog.text


def test_every_plans_identifier_competes_and_pairs_cross_families(tmp_path: Path) -> None:
    """Model folders of two plans identifiers (network families): all compete, ensembles mix them, and
    `plans_names` restricts the candidates to some identifiers."""
    other = "2d__resenc"
    results, labels_tr = _tree(tmp_path, (WORSE, BETTER, other))
    choice = _find_best(results, labels_tr)
    names = [c.name for c in choice.candidates]
    assert names[:3] == [WORSE, other, BETTER] and f"ensemble__{other}__{BETTER}" in names
    assert len(names) == 6 and all(c.dice is not None for c in choice.candidates)
    assert choice.chosen == (other,)  # the best single (ties: singles first)
    assert "-c 2d --plans resenc\n" in (results / "inference_instructions.txt").read_text()
    only = _find_best(results, labels_tr, plans_names=["resenc"], allow_ensembles=False)
    assert [c.name for c in only.candidates] == [other]
    with pytest.raises(EvaluationError, match="matches 2 model folders"):
        _find_best(results, labels_tr, configurations=["2d"])
    chosen = _find_best(results, labels_tr, configurations=["2d"], plans_names=["autoseg"], allow_ensembles=False)
    assert [c.name for c in chosen.candidates] == [WORSE]
    for path in (results / other / "fold_1" / "validation").iterdir():
        path.unlink()
    with pytest.raises(EvaluationError, match="fold 1") as err:
        _find_best(results, labels_tr, configurations=[other])
    assert err.value.hint.endswith(f"autoseg train {DATASET} 2d -p resenc 1")
