"""nnU-Net v2 model folders: read without nnunetv2, same weights, same preprocessing, same segmentation as
nnU-Net's own prediction; unknown architectures, pickled objects and pickle-only postprocessing refused.

The fixture (tests/data/nnunet) was made by nnU-Net 2.8.1's own code (benchmarks/make_nnunet_fixture.py):
tiny PlainConvUNet 3d_fullres, PlainConvUNet 2d with the NoMirroring trainer, ResidualEncoderUNet (ResEnc M
plans) 3d_fullres, and a region-based PlainConvUNet 3d_fullres (regions_class_order), each with nnU-Net's
predictions of two scans (one needs cropping and resampling).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from autoseg import api
from autoseg.cli import app
from autoseg.inference import PredictOptions
from autoseg.inference.postprocess import load_rules
from autoseg.io.readers import read_images, read_label
from autoseg.model.build import build_network
from autoseg.model_folder import ModelFolder, load_checkpoint
from autoseg.sharing.nnunet_import import PP_FUNCTION, cached_import, import_nnunet, is_nnunet_model_folder
from autoseg.sharing.nnunet_model import NnunetModelError
from autoseg.sharing.nnunet_weights import autoseg_key, load_nnunet_checkpoint

FIXTURE = Path(__file__).parent / "data" / "nnunet"
MODELS = ("Dataset990_Tiny/nnUNetTrainer__nnUNetPlans__3d_fullres",
          "Dataset990_Tiny/nnUNetTrainerNoMirroring__nnUNetPlans__2d",
          "Dataset990_Tiny/nnUNetTrainer__nnUNetResEncUNetMPlans__3d_fullres",
          "Dataset991_TinyRegions/nnUNetTrainer__nnUNetPlans__3d_fullres")
PLAIN_3D = MODELS[0]
#: nnU-Net accumulates the sliding window in float16: where its two best classes are this close (probability
#: difference), its own rounding decides. On the fixture, nnU-Net's float16 and float32 runs disagree on up to
#: 0.4 % of the voxels (these random tiny networks have many near-ties), at margins up to 0.03.
FP16_MARGIN = 0.05


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch copy of the fixture (nothing is ever written into tests/data)."""
    target = tmp_path_factory.mktemp("nnunet") / "fixture"  # <dataset>/<model>, imagesTs
    shutil.copytree(FIXTURE, target)
    return target


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _copy(nnunet: Path, tmp_path: Path, name: str = PLAIN_3D) -> Path:
    return Path(shutil.copytree(nnunet / name, tmp_path / name))


@pytest.mark.parametrize("name", MODELS)
def test_weights_are_nnunets_tensor_for_tensor(nnunet: Path, tmp_path: Path, name: str) -> None:
    imported = import_nnunet(nnunet / name, tmp_path / "out")
    theirs = load_nnunet_checkpoint(nnunet / name / "fold_0" / "checkpoint_final.pth")["network_weights"]
    ours = load_checkpoint(ModelFolder(imported.folder).checkpoint(0, "final"))["network"]
    plans = ModelFolder(imported.folder).load_plans()
    topology = plans.configurations[imported.configuration].topology
    compared = 0
    for key, tensor in theirs.items():
        mapped = autoseg_key(key, topology.n_stages)
        if mapped is not None:
            assert torch.equal(ours[mapped], tensor), key
            compared += 1
    network = build_network(topology, in_channels=len(plans.channel_names), num_classes=plans.num_classes)
    network.load_state_dict(ours)  # strict: every tensor of autoseg's network is there
    extra = set(ours) - {autoseg_key(k, topology.n_stages) for k in theirs}
    assert compared > 20 and all(k.endswith("conv.bias") for k in extra)  # ResEnc skips: nnU-Net has no bias
    assert all(not ours[k].any() for k in extra)
    assert imported.mirror_axes == (() if "NoMirroring" in name else (0, 1, 2))


def _nnunet_gaussian_axes(patch, sigma_scale=1 / 8) -> list[np.ndarray]:
    """nnU-Net's importance map factors: centred on voxel n // 2 (autoseg: (n - 1) / 2, symmetric) and cut at
    4 sigma (scipy's gaussian_filter of a delta)."""
    axes = []
    for n in patch:
        sigma, offsets = n * sigma_scale, np.arange(n) - n // 2
        axis = np.exp(-0.5 * (offsets / sigma) ** 2) * (np.abs(offsets) <= int(4 * sigma + 0.5))
        axes.append(axis / axis.max())
    return axes


def _margin(probabilities: np.ndarray, name: str) -> np.ndarray:
    """How far nnU-Net's decision is from a tie: best minus second probability, or for regions the smallest
    distance of a region's sigmoid from 0.5."""
    probabilities = probabilities.astype(np.float32)
    if "Regions" in name:
        return np.abs(probabilities - 0.5).min(axis=0)
    ordered = np.sort(probabilities, axis=0)
    return ordered[-1] - ordered[-2]


def _predict(nnunet: Path, name: str, output: Path) -> dict[str, tuple[np.ndarray, object]]:
    report = api.predict(nnunet / "imagesTs", output, model=nnunet / name, options=PredictOptions(device="cpu"))
    assert not report.failed
    return {case: read_label(output / f"{case}.nii.gz") for case in ("a", "b")}


@pytest.mark.parametrize("name", MODELS)
def test_with_nnunets_gaussian_the_segmentation_is_nnunets_voxel_for_voxel(
        nnunet: Path, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Preprocessing, network, mirroring, tiling, export: all nnU-Net's. Its float32 run (accumulators and
    Gaussian in float32, nothing else changed) is reproduced exactly once the Gaussian is centred as its is."""
    from autoseg.inference import sliding, tiling

    monkeypatch.setattr(tiling, "gaussian_axes", _nnunet_gaussian_axes)
    monkeypatch.setattr(sliding, "gaussian_axes", _nnunet_gaussian_axes)
    for case, (ours, geometry) in _predict(nnunet, name, tmp_path / "pred").items():
        exact, their_geometry = read_label(nnunet / name / "predictions_fp32" / f"{case}.nii.gz")
        assert geometry == their_geometry
        assert np.array_equal(ours, exact), f"{case}: {(ours != exact).sum()} voxels differ"
        assert len(np.unique(ours)) > 1


@pytest.mark.parametrize("name", MODELS)
def test_predict_m_on_the_nnunet_folder_agrees_with_nnunets_own_prediction(nnunet: Path, tmp_path: Path,
                                                                           name: str) -> None:
    """Against nnU-Net as shipped (float16 accumulators): voxels differ only where its two best classes are
    within its float16 rounding, and autoseg's own Gaussian moves a few more near-ties."""
    for case, (ours, geometry) in _predict(nnunet, name, tmp_path / "pred").items():
        theirs, their_geometry = read_label(nnunet / name / "predictions" / f"{case}.nii.gz")
        exact, _ = read_label(nnunet / name / "predictions_fp32" / f"{case}.nii.gz")
        assert geometry == their_geometry
        assert (ours != exact).mean() < 0.01  # autoseg centres its Gaussian at (n - 1) / 2: near-ties move
        margin = _margin(np.load(nnunet / name / "predictions" / f"{case}.npz")["probabilities"], name)
        differ = ours != theirs
        assert differ.mean() < 0.01 and (not differ.any() or margin[differ].max() < FP16_MARGIN)


def test_preprocessing_equals_nnunets(nnunet: Path, tmp_path: Path) -> None:
    from autoseg.preprocessing.case import preprocess_arrays

    folder = ModelFolder(import_nnunet(nnunet / PLAIN_3D, tmp_path).folder)
    plans = folder.load_plans()
    images, geometry = read_images([nnunet / "imagesTs" / f"b_000{c}.nii.gz" for c in (0, 1)])
    ours = preprocess_arrays(images, None, geometry, plans=plans, config=plans.configurations["3d_fullres"]).data
    theirs = np.load(nnunet / PLAIN_3D / "preprocessed_b.npz")["data"]
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_cli_import_writes_a_model_folder_once(nnunet: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["import-nnunet", str(nnunet / PLAIN_3D), "-o", str(tmp_path), "-f", "0"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "3d_fullres__nnUNetTrainer-nnUNetPlans"
    assert "autoseg predict" in result.output and str(folder) in result.output.replace("\n", "")
    assert {p.name for p in folder.iterdir()} == {"plans.json", "dataset.json", "training.json", "fold_0"}
    record = json.loads((folder / "training.json").read_text())
    assert record["trainer"] == "nnUNetTrainer" and len(record["sha256"]) == 3
    again = runner.invoke(app, ["import-nnunet", str(nnunet / PLAIN_3D), "-o", str(tmp_path)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_the_conversion_cache_converts_once(nnunet: Path, tmp_path: Path) -> None:
    first = cached_import(nnunet / PLAIN_3D, cache=tmp_path)
    stamp = (first / "fold_0" / "checkpoint_final.pt").stat().st_mtime_ns
    assert cached_import(nnunet / PLAIN_3D, cache=tmp_path) == first
    assert (first / "fold_0" / "checkpoint_final.pt").stat().st_mtime_ns == stamp
    assert is_nnunet_model_folder(nnunet / PLAIN_3D) and not is_nnunet_model_folder(first)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["architecture"].update(network_class_name="dynamic_network_architectures.architectures.primus.Primus"),
     "network class 'dynamic_network_architectures.architectures.primus.Primus'"),
    (lambda c: c.update(normalization_schemes=["CTNormalization", "MyNormalization"]),
     "normalization scheme 'MyNormalization'"),
    (lambda c: c.update(resampling_fn_data="resample_torch_fornnunet"), "resampling function"),
    (lambda c: c["architecture"]["arch_kwargs"].update(nonlin="torch.nn.GELU"), "nonlin 'torch.nn.GELU'"),
])
def test_what_autoseg_cannot_reproduce_is_refused_by_name(nnunet: Path, tmp_path: Path, edit, message: str) -> None:
    source = _copy(nnunet, tmp_path)
    plans = json.loads((source / "plans.json").read_text())
    edit(plans["configurations"]["3d_fullres"])
    (source / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(NnunetModelError, match="cannot be reproduced") as error:
        import_nnunet(source, tmp_path / "out")
    assert message in str(error.value) and "plans.json" in str(error.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


MARKER: list[str] = []


def _side_effect(text: str) -> str:
    MARKER.append(text)
    return text


class Payload:
    """Runs `_side_effect` when unpickled: what a hostile checkpoint would do."""

    def __reduce__(self):
        return (_side_effect, ("unpickled",))


def test_a_checkpoint_with_a_pickled_object_is_refused_unloaded(nnunet: Path, tmp_path: Path) -> None:
    source = _copy(nnunet, tmp_path)
    checkpoint = source / "fold_0" / "checkpoint_final.pth"
    payload = load_nnunet_checkpoint(checkpoint)
    torch.save({**payload, "extra": Payload()}, checkpoint)
    with pytest.raises(NnunetModelError, match=r"unpickle .*_side_effect"):
        import_nnunet(source, tmp_path / "out")
    with pytest.raises(NnunetModelError, match="unpickle"):
        api.predict(nnunet / "imagesTs", tmp_path / "pred", model=source)
    assert MARKER == []


def test_postprocessing_comes_from_json_never_from_the_pickle(nnunet: Path, tmp_path: Path) -> None:
    source = _copy(nnunet, tmp_path)
    crossval = source / "crossval_results_folds_0"
    crossval.mkdir()
    (crossval / "postprocessing.pkl").write_bytes(b"\x80\x04not read")
    with pytest.raises(NnunetModelError, match="postprocessing.pkl is a pickle"):
        import_nnunet(source, tmp_path / "out")
    assert import_nnunet(source, tmp_path / "out", postprocessing=False).postprocessing is None
    (crossval / "postprocessing.json").write_text(json.dumps({
        "postprocessing_fns": [PP_FUNCTION, PP_FUNCTION],
        "postprocessing_kwargs": [{"labels_or_regions": [1, 2]}, {"labels_or_regions": 2}]}))
    imported = import_nnunet(source, tmp_path / "out", overwrite=True)
    rules = load_rules(imported.postprocessing)
    assert [(r.name, r.values) for r in rules.keep_largest] == [("all foreground", (1, 2)), ("box", (2,))]


def test_an_imported_model_exports_and_predicts_from_its_archive(nnunet: Path, tmp_path: Path) -> None:
    from autoseg.sharing import export_model

    results = tmp_path / "results" / "Dataset990_Tiny"
    imported = import_nnunet(nnunet / PLAIN_3D, results)
    archive = tmp_path / "model.zip"
    export_model(results, archive, configurations=["3d_fullres"], plans_name="nnUNetTrainer-nnUNetPlans")
    options = PredictOptions(device="cpu", tta=False)
    api.predict(nnunet / "imagesTs", tmp_path / "folder", model=imported.folder, options=options)
    api.predict(nnunet / "imagesTs", tmp_path / "zip", model=archive, options=options)
    for case in ("a", "b"):
        assert np.array_equal(read_label(tmp_path / "zip" / f"{case}.nii.gz")[0],
                              read_label(tmp_path / "folder" / f"{case}.nii.gz")[0])


def test_malformed_or_absurd_plans_are_refused_before_any_network_is_built(nnunet: Path, tmp_path: Path) -> None:
    source = _copy(nnunet, tmp_path)
    plans = json.loads((source / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [10**6] * 4
    (source / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(NnunetModelError, match="no network can be built"):
        import_nnunet(source, tmp_path / "out")
    del plans["configurations"]["3d_fullres"]["patch_size"]
    (source / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(NnunetModelError, match="incomplete or malformed.*patch_size"):
        import_nnunet(source, tmp_path / "out")


def _nnunet_zip(nnunet: Path, path: Path, *, link: bool = False) -> Path:
    """A zip in nnUNetv2_export_model_to_zip's layout (two models, their extra files, a stray `..` entry)."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zipped:
        for name in (PLAIN_3D, MODELS[1]):
            for member in ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth"):
                zipped.write(nnunet / name / member, f"{name}/{member}")
            zipped.writestr(f"{name}/fold_0/debug.json", "{}")
        zipped.writestr("Dataset990_Tiny/inference_information.json", "{}")
        zipped.writestr("../outside.txt", "never unpacked")
        if link:
            info = zipfile.ZipInfo(f"{MODELS[1]}/crossval_results_folds_0/postprocessing.json")
            info.external_attr = 0o120777 << 16
            zipped.writestr(info, "/etc/passwd")
    return path


def test_an_nnunet_zip_predicts_and_imports_by_configuration(nnunet: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _nnunet_zip(nnunet, tmp_path / "nnunet.zip")
    monkeypatch.setenv("AUTOSEG_RESULTS", str(tmp_path / "results"))
    result = CliRunner().invoke(app, ["import-nnunet", str(archive), "-c", "3d_fullres"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "results" / "Dataset990_Tiny" / "3d_fullres__nnUNetTrainer-nnUNetPlans" / "plans.json").is_file()
    with pytest.raises(NnunetModelError, match="holds 2 models"):
        import_nnunet(archive, tmp_path / "out")
    imported = import_nnunet(archive, tmp_path / "out", configuration="2d")
    assert imported.folder.name == "2d__nnUNetTrainerNoMirroring-nnUNetPlans" and imported.source == archive
    options = PredictOptions(device="cpu")
    api.predict(nnunet / "imagesTs", tmp_path / "zip", model=archive, configuration="2d", options=options)
    api.predict(nnunet / "imagesTs", tmp_path / "folder", model=nnunet / MODELS[1], options=options)
    for case in ("a", "b"):
        assert np.array_equal(read_label(tmp_path / "zip" / f"{case}.nii.gz")[0],
                              read_label(tmp_path / "folder" / f"{case}.nii.gz")[0])
    assert not (tmp_path / "outside.txt").exists()
    with pytest.raises(NnunetModelError, match="not a plain file"):
        import_nnunet(_nnunet_zip(nnunet, tmp_path / "link.zip", link=True), tmp_path / "out2", configuration="2d")


def test_inherits_from_and_a_reorienting_reader(nnunet: Path, tmp_path: Path) -> None:
    from autoseg.sharing.nnunet_model import configuration_entry

    plans = json.loads((nnunet / PLAIN_3D / "plans.json").read_text())
    plans["configurations"]["3d_fullres_bs8"] = {"inherits_from": "3d_fullres", "batch_size": 8}
    entry = configuration_entry(plans, "3d_fullres_bs8", tmp_path)
    assert entry["batch_size"] == 8 and entry["patch_size"] == plans["configurations"]["3d_fullres"]["patch_size"]
    assert "inherits_from" not in entry
    source = _copy(nnunet, tmp_path)
    dataset = json.loads((source / "dataset.json").read_text())
    dataset["overwrite_image_reader_writer"] = "NibabelIOWithReorient"
    (source / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(NnunetModelError, match="image reader 'NibabelIOWithReorient'"):
        import_nnunet(source, tmp_path / "out")


def test_a_checkpoint_whose_aliases_differ_is_refused(nnunet: Path, tmp_path: Path) -> None:
    """nnU-Net stores every conv and norm twice (as `conv` and in `all_modules`); it would load the second."""
    source = _copy(nnunet, tmp_path)
    checkpoint = source / "fold_0" / "checkpoint_final.pth"
    payload = load_nnunet_checkpoint(checkpoint)
    weights = {key: value.clone() for key, value in payload["network_weights"].items()}
    weights["encoder.stages.1.0.convs.0.all_modules.0.weight"] += 1
    torch.save({**payload, "network_weights": weights}, checkpoint)
    with pytest.raises(NnunetModelError, match=r"all_modules\.0\.weight differs"):
        import_nnunet(source, tmp_path / "out")
