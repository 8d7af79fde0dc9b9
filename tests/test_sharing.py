"""Model archives: export -> install -> predict equals predicting from the training folder; unpacking
refuses everything that is not an expected file (zip-slip, links, tampering) and leaves nothing behind."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from model_builders import make_model_folder
from typer.testing import CliRunner

from autoseg import api
from autoseg.cli import app
from autoseg.evaluation.find_best import BEST_FILE, RULES_NAME, BestChoice
from autoseg.inference import PredictOptions
from autoseg.io.readers import read_label
from autoseg.model_folder import CheckpointError, ModelFolder
from autoseg.serialization import save_contract, write_json
from autoseg.sharing import ArchiveError, export_model, install_model, read_manifest
from autoseg.sharing.archive import MANIFEST

DATASET = "Dataset900_Example"
OPTIONS = PredictOptions(tta=False)


@pytest.fixture(scope="module")
def results(example_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<results root>/Dataset900_Example with a 3d_fullres model of folds 0 and 1 (untrained, small)."""
    dataset_results = tmp_path_factory.mktemp("results") / DATASET
    folder = make_model_folder(dataset_results, example_dataset, folds=(0, 1))
    payload = torch.load(folder.checkpoint(0, "final"), weights_only=True)
    payload["optimizer"] = {"state": {}, "param_groups": []}  # what a real training checkpoint also holds
    torch.save(payload, folder.checkpoint(0, "final"))
    return dataset_results


@pytest.fixture(scope="module")
def archive(results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("export") / "model.zip"
    export_model(results, output, configurations=["3d_fullres"])
    return output


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {path.name: read_label(path)[0] for path in sorted(folder.glob("*.nii.gz"))}


def test_install_then_predict_equals_predicting_from_the_training_folder(
        results: Path, archive: Path, example_dataset: Path, tmp_path: Path) -> None:
    scans = example_dataset / "imagesTs"
    api.predict(scans, tmp_path / "from_training", model=results / "3d_fullres__autoseg", options=OPTIONS)
    installed = install_model(archive, tmp_path / "elsewhere")
    api.predict(scans, tmp_path / "from_install", model=installed.model_folder("3d_fullres"), options=OPTIONS)
    api.predict(scans, tmp_path / "from_zip", model=archive, options=OPTIONS)
    expected = _labels(tmp_path / "from_training")
    assert len(expected) == 2
    for name in ("from_install", "from_zip"):
        got = _labels(tmp_path / name)
        assert got.keys() == expected.keys()
        assert all(np.array_equal(got[case], expected[case]) for case in expected), name


def test_archive_holds_weights_only_and_the_folds_asked_for(results: Path, tmp_path: Path) -> None:
    output = tmp_path / "fold1.zip"
    manifest = export_model(results, output, configurations=["3d_fullres"], folds=["1"])
    assert [(m.folder, m.folds) for m in manifest.models] == [("3d_fullres__autoseg", ("1",))]
    with zipfile.ZipFile(output) as zipped:
        names = set(zipped.namelist())
        checkpoint = torch.load(io.BytesIO(zipped.read(f"{DATASET}/3d_fullres__autoseg/fold_1/checkpoint_final.pt")),
                                weights_only=True)
    assert names == {MANIFEST} | {f"{DATASET}/3d_fullres__autoseg/{n}" for n in
                                  ("plans.json", "dataset.json", "training.json", "fold_1/checkpoint_final.pt")}
    assert set(checkpoint) <= {"network", "mirror_axes", "epoch", "total_epochs"} and "network" in checkpoint
    export_model(results, tmp_path / "fold0.zip", configurations=["3d_fullres"], folds=["0"])
    with zipfile.ZipFile(tmp_path / "fold0.zip") as zipped:  # fold 0's training checkpoint has optimizer state
        stripped = torch.load(io.BytesIO(zipped.read(f"{DATASET}/3d_fullres__autoseg/fold_0/checkpoint_final.pt")),
                              weights_only=True)
    assert "optimizer" not in stripped and stripped["network"].keys() == checkpoint["network"].keys()


def test_export_of_the_same_models_is_byte_identical_apart_from_the_date(results: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    export_model(results, first, configurations=["3d_fullres"])
    export_model(results, second, configurations=["3d_fullres"])
    with zipfile.ZipFile(first) as a, zipfile.ZipFile(second) as b:
        members = [n for n in a.namelist() if n != MANIFEST]
        assert members == [n for n in b.namelist() if n != MANIFEST]
        assert all(a.read(n) == b.read(n) for n in members)


def test_export_errors_name_the_missing_fold_and_configuration(results: Path, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="fold.*3.*no checkpoint_final"):
        export_model(results, tmp_path / "x.zip", configurations=["3d_fullres"], folds=["3"])
    with pytest.raises(ArchiveError, match="checkpoint"):
        export_model(results, tmp_path / "x.zip", configurations=["3d_fullres"], checkpoint="newest")
    with pytest.raises(Exception, match="plans.json"):
        export_model(results, tmp_path / "x.zip", configurations=["2d"])
    assert not (tmp_path / "x.zip").exists()


def test_export_names_a_missing_settings_file(results: Path, tmp_path: Path) -> None:
    copy = tmp_path / DATASET
    shutil.copytree(results, copy)
    (copy / "3d_fullres__autoseg" / "training.json").unlink()
    with pytest.raises(ArchiveError, match="training.json") as caught:
        export_model(copy, tmp_path / "x.zip", configurations=["3d_fullres"])
    assert caught.value.path == str(copy / "3d_fullres__autoseg" / "training.json")
    assert not (tmp_path / "x.zip").exists()


def test_postprocessing_rules_travel_only_with_the_chosen_setup(results: Path, tmp_path: Path) -> None:
    rules = {"format": 1, "keep_largest": []}
    write_json(results / RULES_NAME, rules)
    chosen = BestChoice(dataset=DATASET, candidates=(), chosen=("3d_fullres__autoseg",),
                        chosen_name="3d_fullres__autoseg", postprocessing_file=str(results / RULES_NAME),
                        postprocessing_steps=(),
                        dice_before_postprocessing=0.5, dice_after_postprocessing=0.5)
    try:
        save_contract(results / BEST_FILE, chosen)
        manifest = export_model(results, tmp_path / "pp.zip", configurations=["3d_fullres"])
        assert manifest.postprocessing == f"{DATASET}/{RULES_NAME}"
        installed = install_model(tmp_path / "pp.zip", tmp_path / "root")
        assert installed.postprocessing is not None and json.loads(installed.postprocessing.read_text()) == rules
        other = BestChoice(**{**chosen.__dict__, "chosen": ("2d__autoseg",)})
        save_contract(results / BEST_FILE, other)
        assert export_model(results, tmp_path / "no_pp.zip", configurations=["3d_fullres"]).postprocessing is None
    finally:
        (results / BEST_FILE).unlink(missing_ok=True)
        (results / RULES_NAME).unlink(missing_ok=True)


def _tampered(archive: Path, target: Path, *, add: dict[str, bytes] | None = None, replace: dict[str, bytes] |
              None = None, symlink: str | None = None) -> Path:
    """A copy of `archive` with members added or replaced (the manifest left as it was)."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(target, "w") as sink:
        for info in source.infolist():
            sink.writestr(info, (replace or {}).get(info.filename, source.read(info.filename)))
        for name, data in (add or {}).items():
            sink.writestr(name, data)
        if symlink is not None:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            sink.writestr(info, "/etc/passwd")
    return target


@pytest.mark.parametrize("evil", ["../escaped.json", "/tmp/absolute.json", f"{DATASET}/../../escaped.json",
                                  f"{DATASET}/3d_fullres__autoseg/run.py",
                                  f"{DATASET}/3d_fullres__autoseg/x/../plans.json", "C:/windows.json",
                                  f"{DATASET}\\3d_fullres__autoseg\\plans.json"])
def test_unpacking_refuses_unexpected_names_and_writes_nothing(archive: Path, tmp_path: Path, evil: str) -> None:
    bad = _tampered(archive, tmp_path / "bad.zip", add={evil: b"{}"})
    root = tmp_path / "root"
    with pytest.raises(ArchiveError, match="unexpected entry"):
        install_model(bad, root)
    assert not root.exists() and not (tmp_path / "escaped.json").exists()


def test_unpacking_refuses_links_and_tampered_files(archive: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    link = _tampered(archive, tmp_path / "link.zip", symlink=f"{DATASET}/3d_fullres__autoseg/plans.json.pt")
    with pytest.raises(ArchiveError, match="unexpected entry"):
        install_model(link, root)
    member = f"{DATASET}/3d_fullres__autoseg/training.json"
    with zipfile.ZipFile(archive) as zipped:
        changed = zipped.read(member).replace(b"{", b"{ ", 1)
    with pytest.raises(ArchiveError, match="damaged"):
        install_model(_tampered(archive, tmp_path / "changed.zip", replace={member: changed}), root)
    assert not root.exists()  # refused before the results root is even created
    extra = _tampered(archive, tmp_path / "extra.zip", add={f"{DATASET}/3d_fullres__autoseg/fold_4/checkpoint_final.pt":
                                                               b"x"})
    with pytest.raises(ArchiveError, match="manifest"):
        install_model(extra, root)


def _with_manifest(archive: Path, target: Path, edit, *, members: dict[str, tuple[bytes, int]] | None = None) -> Path:
    """A copy of `archive` whose manifest is `edit(manifest dict)` (members replaced by (data, method) first)."""
    import hashlib

    with zipfile.ZipFile(archive) as source:
        manifest = json.loads(source.read(MANIFEST))
        contents = {i.filename: (source.read(i.filename), i.compress_type) for i in source.infolist()}
    for name, (data, method) in (members or {}).items():
        contents[name] = (data, method)
        entry = next(f for f in manifest["files"] if f["path"] == name)
        entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    edit(manifest)
    contents[MANIFEST] = (json.dumps(manifest).encode(), zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(target, "w") as sink:
        for name, (data, method) in contents.items():
            sink.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return target


def _set(path: str, value):
    def edit(manifest: dict) -> None:
        *parents, key = path.split(".")
        node = manifest
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[key] = value
    return edit


@pytest.mark.parametrize("edit", [
    _set("postprocessing", "../../victim/postprocessing.json"), _set("postprocessing", "/tmp/victim.json"),
    _set("models.0.folder", "../victim"), _set("models.0.folder", "/tmp/victim__x"),
    _set("models.0.folds", ["../0"]), _set("dataset", ".."), _set("checkpoint", "../../final"),
    _set("models", []),
])
def test_manifest_paths_are_checked_like_zip_entries(archive: Path, tmp_path: Path, edit) -> None:
    """Issue 19 S1/S2: a manifest naming paths outside the results root is refused before anything moves."""
    root = tmp_path / "root"
    victim = root / "victim"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("mine")
    bad = _with_manifest(archive, tmp_path / "bad.zip", edit)
    with pytest.raises(ArchiveError, match="manifest"):
        install_model(bad, root)
    with pytest.raises(ArchiveError, match="manifest"):
        read_manifest(bad)
    assert sorted(p.name for p in root.iterdir()) == ["victim"] and (victim / "keep.txt").read_text() == "mine"


def test_oversized_manifest_and_inflating_checkpoints_are_refused_before_unpacking(archive: Path,
                                                                                     tmp_path: Path) -> None:
    """Issue 19 S3: caps checked on the zip's declared sizes, before reading or writing anything large."""
    root = tmp_path / "root"
    padded = _with_manifest(archive, tmp_path / "big.zip", lambda m: m.update(pad=" " * (9 * 2**20)))
    with pytest.raises(ArchiveError, match="manifest is 9 MiB"):
        install_model(padded, root)
    member = f"{DATASET}/3d_fullres__autoseg/fold_0/checkpoint_final.pt"
    bomb = _with_manifest(archive, tmp_path / "bomb.zip", lambda m: None,
                          members={member: (bytes(32 * 2**20), zipfile.ZIP_DEFLATED)})
    with pytest.raises(ArchiveError, match="inflates too much"):
        install_model(bomb, root)
    assert not (root / DATASET).exists()
    with pytest.raises(ArchiveError, match="damaged: another size"):
        install_model(_with_manifest(archive, tmp_path / "size.zip", _set("files.0.size", 1)), root)


def test_absurd_plans_are_refused_on_install(archive: Path, tmp_path: Path) -> None:
    """Issue 19 S3: a well-formed archive whose plans ask for a 100000^3 patch never gets installed."""
    member = f"{DATASET}/3d_fullres__autoseg/plans.json"
    with zipfile.ZipFile(archive) as zipped:
        plans = json.loads(zipped.read(member))
    plans["configurations"]["3d_fullres"]["patch_size"] = [100000] * 3
    bad = _with_manifest(archive, tmp_path / "plans.zip", lambda m: None,
                         members={member: (json.dumps(plans).encode(), zipfile.ZIP_DEFLATED)})
    root = tmp_path / "root"
    with pytest.raises(CheckpointError, match="patch \\(100000, 100000, 100000\\)"):
        install_model(bad, root)
    assert [p.name for p in root.iterdir()] == []


def test_not_a_zip_and_existing_installs_are_clear_errors(archive: Path, tmp_path: Path) -> None:
    fake = tmp_path / "model.zip"
    fake.write_text("hello")
    with pytest.raises(ArchiveError, match="not a zip"):
        read_manifest(fake)
    root = tmp_path / "root"
    installed = install_model(archive, root)
    marker = installed.model_folder("3d_fullres") / "marker"
    marker.write_text("old")
    with pytest.raises(ArchiveError, match="already installed"):
        install_model(archive, root)
    install_model(archive, root, overwrite=True)
    assert not marker.exists() and ModelFolder(installed.model_folder("3d_fullres")).folds() == ("0", "1")
    assert [p.name for p in root.iterdir()] == [DATASET]  # no staging folder left behind


def test_cli_export_install_and_env(results: Path, roots: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    (roots / "results").mkdir(parents=True)
    (roots / "results" / DATASET).symlink_to(results, target_is_directory=True)
    output = tmp_path / "cli.zip"
    done = runner.invoke(app, ["export-model", DATASET, "-c", "3d_fullres", "-f", "0", "1", "-o", str(output)])
    assert done.exit_code == 0, done.output
    assert read_manifest(output).models[0].folds == ("0", "1")
    target = tmp_path / "installed"
    done = runner.invoke(app, ["install-model", str(output), "--results", str(target)])
    assert done.exit_code == 0, done.output
    assert (target / DATASET / "3d_fullres__autoseg" / "fold_1" / "checkpoint_final.pt").is_file()
    # outside AUTOSEG_RESULTS, predict -d would not find it: the printed command names the folder
    assert f"-m {target / DATASET / '3d_fullres__autoseg'}" in done.output.replace("\n", "")
    again = runner.invoke(app, ["install-model", str(output), "--results", str(target)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    monkeypatch.setenv("AUTOSEG_RESULTS", str(target))
    again = runner.invoke(app, ["install-model", str(output), "--overwrite"])
    assert again.exit_code == 0 and f"-d {DATASET} -c 3d_fullres" in again.output, again.output
    env = runner.invoke(app, ["env", "--json"])
    assert env.exit_code == 0, env.output
    report = json.loads(env.output[env.output.index("{"):])
    assert report["cpus_allotted"] >= 1 and report["packages"]["torch"] == torch.__version__
    assert {p["kind"]: p["variable"] for p in report["paths"]}["results"] == "AUTOSEG_RESULTS"


def test_cli_export_onnx_writes_a_checked_model_and_its_sidecar(results: Path, roots: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    output = tmp_path / "fold1.onnx"
    done = CliRunner().invoke(app, ["export-onnx", "-m", str(results / "3d_fullres__autoseg"), "-f", "1",
                                    "-o", str(output)])
    assert done.exit_code == 0, done.output
    assert output.is_file() and "max |onnx - torch|" in done.output
    sidecar = json.loads(Path(f"{output}.json").read_text())
    assert sidecar["patch_size"] and sidecar["labels"]
    missing = CliRunner().invoke(app, ["export-onnx", "-m", str(results / "3d_fullres__autoseg"), "-f", "4",
                                       "-o", str(tmp_path / "x.onnx")])
    assert missing.exit_code == 2 and "checkpoint" in missing.output and not (tmp_path / "x.onnx").exists()
