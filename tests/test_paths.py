"""Path settings and DATASET resolution (id, name, path), nnU-Net variables as fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoseg.errors import DatasetError
from autoseg.paths import data_root, resolve_dataset


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AUTOSEG_RAW", "AUTOSEG_PREPROCESSED", "AUTOSEG_RESULTS",
                 "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(name, raising=False)


def _make(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text("{}")
    return folder


def test_autoseg_variable_wins_over_nnunet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "nn"))
    assert data_root("raw") == tmp_path / "nn"
    monkeypatch.setenv("AUTOSEG_RAW", str(tmp_path / "auto"))
    assert data_root("raw") == tmp_path / "auto"


def test_default_is_under_the_working_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert data_root("results") == tmp_path / "autoseg_data" / "results"


def test_quoted_variable_is_unquoted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOSEG_PREPROCESSED", f'"{tmp_path}"')
    assert data_root("preprocessed") == tmp_path


def test_resolve_by_id_name_and_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = _make(tmp_path / "raw", "Dataset004_Hippo")
    monkeypatch.setenv("AUTOSEG_RAW", str(tmp_path / "raw"))
    monkeypatch.setenv("AUTOSEG_PREPROCESSED", str(tmp_path / "pre"))
    for spec in ("4", "004", "Dataset004_Hippo", str(folder)):
        location = resolve_dataset(spec)
        assert location.raw == folder.resolve() or location.raw == folder
        assert location.name == "Dataset004_Hippo"
    assert resolve_dataset("4").preprocessed == tmp_path / "pre" / "Dataset004_Hippo"


def test_unknown_and_ambiguous_ids_explain_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOSEG_RAW", str(tmp_path))
    with pytest.raises(DatasetError, match="no folder Dataset007_") as err:
        resolve_dataset("7")
    assert "AUTOSEG_RAW" in err.value.hint
    _make(tmp_path, "Dataset005_A")
    _make(tmp_path, "Dataset005_B")
    with pytest.raises(DatasetError, match="ambiguous"):
        resolve_dataset("5")
    with pytest.raises(DatasetError, match="not a folder"):
        resolve_dataset("NoSuchDataset")
