"""Splits: identical to nnU-Net's (sklearn KFold, seed 12345), saved, honoured, validated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoseg.errors import SettingsError
from autoseg.training.splits import fold_cases, load_or_create_splits, make_splits

IDS = [f"case_{i:03d}" for i in range(23)]


def test_folds_partition_the_cases() -> None:
    splits = make_splits(IDS)
    assert len(splits) == 5
    val = [c for s in splits for c in s["val"]]
    assert sorted(val) == sorted(IDS) and len(set(val)) == len(IDS)
    for split in splits:
        assert sorted(split["train"] + split["val"]) == sorted(IDS)


def test_same_as_sklearn_kfold_used_by_nnunet() -> None:
    model_selection = pytest.importorskip("sklearn.model_selection")
    ours = make_splits(list(reversed(IDS)))
    kfold = model_selection.KFold(n_splits=5, shuffle=True, random_state=12345)
    for split, (train, val) in zip(ours, kfold.split(sorted(IDS))):
        assert split["train"] == [sorted(IDS)[i] for i in train]
        assert split["val"] == [sorted(IDS)[i] for i in val]


def test_existing_nnunet_splits_are_honoured(tmp_path: Path) -> None:
    custom = [{"train": IDS[1:], "val": IDS[:1]}] * 5
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "splits_final.json").write_text(json.dumps(custom))
    splits = load_or_create_splits(tmp_path / "pre", IDS, extra=[tmp_path / "raw"])
    assert splits == custom
    assert json.loads((tmp_path / "pre" / "splits.json").read_text()) == custom


def test_new_splits_are_written_and_reused(tmp_path: Path) -> None:
    first = load_or_create_splits(tmp_path, IDS)
    assert (tmp_path / "splits.json").is_file()
    assert load_or_create_splits(tmp_path, IDS) == first


def test_bad_splits_and_folds_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "splits.json").write_text(json.dumps([{"train": ["nope"], "val": []}]))
    with pytest.raises(SettingsError, match="not in the dataset"):
        load_or_create_splits(tmp_path, IDS)
    with pytest.raises(SettingsError, match="does not exist"):
        fold_cases(make_splits(IDS), 7, IDS)
    assert fold_cases(make_splits(IDS), "all", IDS) == (sorted(IDS), [])
    with pytest.raises(SettingsError, match="cannot be split"):
        make_splits(IDS[:3])


def test_small_datasets_get_fewer_folds(tmp_path: Path) -> None:
    splits = load_or_create_splits(tmp_path, IDS[:3])
    assert len(splits) == 3 and all(len(s["val"]) == 1 for s in splits)
