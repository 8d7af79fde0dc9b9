"""nnU-Net v2 cascades (3d_lowres -> 3d_cascade_fullres) predicted and imported without nnunetv2.

The fixture's cascade (tests/data/nnunet/Dataset990_Tiny, made by nnU-Net 2.8.1's own code with
benchmarks/make_nnunet_fixture.py): 3d_lowres trained on every case (fold "all"), 3d_cascade_fullres on fold
0 with the 3d_lowres segmentations as extra one-hot input channels; nnU-Net's predictions of both stages, the
cascade's made from the stored 3d_lowres predictions (`-prev_stage_predictions`).
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_sharing_nnunet import _nnunet_gaussian_axes, nnunet  # noqa: F401 (nnunet: the fixture)

from autoseg import api
from autoseg.errors import SettingsError
from autoseg.inference import PredictOptions
from autoseg.io.readers import read_label
from autoseg.model_folder import ModelFolder
from autoseg.sharing.nnunet_import import cached_import, import_nnunet

LOWRES = "Dataset990_Tiny/nnUNetTrainer__nnUNetPlans__3d_lowres"
CASCADE = "Dataset990_Tiny/nnUNetTrainer__nnUNetPlans__3d_cascade_fullres"
OPTIONS = PredictOptions(device="cpu")


@pytest.fixture(autouse=True)
def _nnunet_like(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scratch conversion cache, and nnU-Net's Gaussian (centred on n // 2) so labels can match exactly."""
    from autoseg.inference import sliding, tiling

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(tiling, "gaussian_axes", _nnunet_gaussian_axes)
    monkeypatch.setattr(sliding, "gaussian_axes", _nnunet_gaussian_axes)


def _probability_error(output: Path, fixture: Path) -> float:
    """Mean absolute difference from nnU-Net's cascade probabilities over both cases (nnU-Net accumulates in
    float16 and divides by a Gaussian cut at 4 sigma, so single border voxels differ more: the mean is used)."""
    errors = [np.abs(np.load(output / f"{case}.npz")["probabilities"]
                     - np.load(fixture / CASCADE / "predictions" / f"{case}.npz")["probabilities"].astype(np.float32))
              for case in ("a", "b")]
    return float(np.mean([e.mean() for e in errors]))


def test_predict_m_on_a_cascade_runs_nnunets_first_stage_then_reproduces_the_cascade(nnunet: Path,  # noqa: F811
                                                                                      tmp_path: Path) -> None:
    output = tmp_path / "chain"
    report = api.predict(nnunet / "imagesTs", output, model=nnunet / CASCADE, options=OPTIONS, save_probabilities=True)
    assert not report.failed and len(report.written) == 2
    for case in ("a", "b"):
        for stage, ours in ((LOWRES, output / ".previous_3d_lowres"), (CASCADE, output)):
            labels, geometry = read_label(ours / f"{case}.nii.gz")
            theirs, their_geometry = read_label(nnunet / stage / "predictions_fp32" / f"{case}.nii.gz")
            assert geometry == their_geometry
            assert np.array_equal(labels, theirs), f"{stage} {case}: {(labels != theirs).sum()} voxels differ"
    # the previous stage's channels matter: nnU-Net's probabilities follow only from the right ones
    right = _probability_error(output, nnunet)
    wrong_stage = tmp_path / "all_background"
    wrong_stage.mkdir()
    for case in ("a", "b"):
        shutil.copyfile(output / ".previous_3d_lowres" / f"{case}.nii.gz", wrong_stage / f"{case}.nii.gz")
        _write_zeros_like(wrong_stage / f"{case}.nii.gz")
    api.predict(nnunet / "imagesTs", tmp_path / "wrong", model=nnunet / CASCADE, options=OPTIONS,
                save_probabilities=True, prev_stage=wrong_stage)
    assert right < 2e-3 and _probability_error(tmp_path / "wrong", nnunet) > 5 * right


def _write_zeros_like(path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    zeros = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(image)))
    zeros.CopyInformation(image)
    sitk.WriteImage(zeros, str(path))


def test_prev_stage_takes_nnunets_own_first_stage_predictions(nnunet: Path, tmp_path: Path) -> None:  # noqa: F811
    api.predict(nnunet / "imagesTs", tmp_path / "given", model=nnunet / CASCADE, options=OPTIONS,
                prev_stage=nnunet / LOWRES / "predictions")
    assert not (tmp_path / "given" / ".previous_3d_lowres").exists()
    for case in ("a", "b"):
        assert np.array_equal(read_label(tmp_path / "given" / f"{case}.nii.gz")[0],
                              read_label(nnunet / CASCADE / "predictions_fp32" / f"{case}.nii.gz")[0])


def test_import_brings_the_previous_stage_along(nnunet: Path, tmp_path: Path) -> None:  # noqa: F811
    imported = import_nnunet(nnunet / CASCADE, tmp_path / "results")
    assert imported.folder.name == "3d_cascade_fullres__nnUNetTrainer-nnUNetPlans" and imported.folds == ("0",)
    assert imported.previous is not None and imported.previous.folds == ("all",)
    assert imported.previous.folder == tmp_path / "results" / "3d_lowres__nnUNetTrainer-nnUNetPlans"
    plans = ModelFolder(imported.folder).load_plans()
    config = plans.configurations["3d_cascade_fullres"]
    assert config.previous_stage == "3d_lowres" and config.topology.dim == 3
    api.predict(nnunet / "imagesTs", tmp_path / "pred", model=imported.folder, options=OPTIONS)
    for case in ("a", "b"):
        assert np.array_equal(read_label(tmp_path / "pred" / f"{case}.nii.gz")[0],
                              read_label(nnunet / CASCADE / "predictions_fp32" / f"{case}.nii.gz")[0])


def test_a_cascade_without_its_first_stage_needs_prev_stage(nnunet: Path, tmp_path: Path,  # noqa: F811
                                                            caplog: pytest.LogCaptureFixture) -> None:
    alone = Path(shutil.copytree(nnunet / CASCADE, tmp_path / "alone" / Path(CASCADE).name))
    imported = import_nnunet(alone, tmp_path / "results")
    assert imported.previous is None and "import that model too" in caplog.text
    with pytest.raises(SettingsError, match="--prev-stage") as error:
        api.predict(nnunet / "imagesTs", tmp_path / "pred", model=alone, options=OPTIONS)
    assert str(alone) in str(error.value) and "nnU-Net's 3d_lowres model folder beside it" in str(error.value)
    report = api.predict(nnunet / "imagesTs", tmp_path / "pred", model=alone, options=OPTIONS,
                         prev_stage=nnunet / LOWRES / "predictions")
    assert len(report.written) == 2


def test_the_cache_key_covers_the_first_stage(nnunet: Path, tmp_path: Path) -> None:  # noqa: F811
    models = Path(shutil.copytree(nnunet / "Dataset990_Tiny", tmp_path / "models"))
    cascade, lowres = models / Path(CASCADE).name, models / Path(LOWRES).name
    first = cached_import(cascade, cache=tmp_path / "cache")
    assert first.name.startswith("3d_cascade_fullres__") and cached_import(cascade, cache=tmp_path / "cache") == first
    assert (first.parent / "3d_lowres__nnUNetTrainer-nnUNetPlans" / "fold_all" / "checkpoint_final.pt").is_file()
    with open(lowres / "fold_all" / "checkpoint_final.pth", "ab") as checkpoint:
        checkpoint.write(b"\0")  # a retrained first stage (torch ignores trailing bytes)
    second = cached_import(cascade, cache=tmp_path / "cache")
    assert second != first and second.name == first.name


def test_a_zip_with_a_cascade_imports_both_stages(nnunet: Path, tmp_path: Path) -> None:  # noqa: F811
    archive = tmp_path / "cascade.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for name, fold in ((LOWRES, "all"), (CASCADE, "0")):
            for member in ("plans.json", "dataset.json", f"fold_{fold}/checkpoint_final.pth"):
                zipped.write(nnunet / name / member, f"{name}/{member}")
    imported = import_nnunet(archive, tmp_path / "results", configuration="3d_cascade_fullres")
    assert imported.previous is not None and imported.previous.configuration == "3d_lowres"
    assert {p.name for p in (tmp_path / "results").iterdir()} == {"3d_cascade_fullres__nnUNetTrainer-nnUNetPlans",
                                                                  "3d_lowres__nnUNetTrainer-nnUNetPlans"}


def test_cli_import_names_both_stages(nnunet: Path, tmp_path: Path) -> None:  # noqa: F811
    from typer.testing import CliRunner

    from autoseg.cli import app

    result = CliRunner().invoke(app, ["import-nnunet", str(nnunet / CASCADE), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = result.output.replace("\n", "")
    assert str(tmp_path / "3d_lowres__nnUNetTrainer-nnUNetPlans") in text and "predict runs it first" in text
