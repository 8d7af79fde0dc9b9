"""The cascade end to end on the example: 3d_lowres cross-validation -> 3d_cascade_fullres training and prediction."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from autoseg import api
from autoseg.cli import app
from autoseg.dataset.load import load_dataset
from autoseg.errors import SettingsError
from autoseg.fingerprint import extract_fingerprint
from autoseg.inference import PredictOptions, Predictor, predict_folder
from autoseg.io.readers import read_label, write_label
from autoseg.model_folder import ModelFolder, load_checkpoint
from autoseg.paths import DatasetLocation
from autoseg.planning import plan
from autoseg.preprocessing.cache import read_case
from autoseg.preprocessing.inverse import restore_label
from autoseg.preprocessing.previous import one_hot, previous_file, to_preprocessed_grid
from autoseg.preprocessing.run import preprocess_dataset
from autoseg.serialization import save_contract
from autoseg.training.augment import perturb_previous
from autoseg.training.cascade import previous_sources
from autoseg.training.data import BatchSource
from autoseg.training.job import fold_run
from autoseg.training.splits import load_or_create_splits

QUICK = {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1, "workers": 0}
CPU = PredictOptions(device="cpu", tta=False)


@pytest.fixture(scope="module")
def cascade(example_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """Plans with tiny 3d_fullres / 3d_lowres / 3d_cascade_fullres setups, preprocessed; lowres fold 0 trained
    (a real model for chained prediction), the lowres cross-validation predictions faked with the reference labels."""
    root = tmp_path_factory.mktemp("cascade")
    patch = pytest.MonkeyPatch()
    patch.setenv("AUTOSEG_PREPROCESSED", str(root / "pre"))
    patch.setenv("AUTOSEG_RESULTS", str(root / "results"))
    dataset = load_dataset(example_dataset)
    plans = plan(extract_fingerprint(dataset), dataset)
    full = plans.configurations["3d_fullres"]
    topology = dataclasses.replace(full.topology, features_per_stage=(4, 8, 8, 8, 8)[: full.topology.n_stages])
    small = dataclasses.replace(full, topology=topology, patch_size=(16, 16, 16), batch_size=2)
    lowres = dataclasses.replace(small, name="3d_lowres", spacing=tuple(2 * s for s in small.spacing),
                                 data_id=f"{plans.plans_name}_3d_lowres", next_stage="3d_cascade_fullres")
    cascade_config = dataclasses.replace(small, name="3d_cascade_fullres", previous_stage="3d_lowres")
    plans = dataclasses.replace(plans, configurations={"3d_fullres": small, "3d_lowres": lowres,
                                                       "3d_cascade_fullres": cascade_config})
    location = DatasetLocation(name=dataset.name, raw=Path(dataset.root))
    save_contract(api.plans_path(location), plans)
    preprocess_dataset(dataset, plans, ["3d_fullres", "3d_lowres", "3d_cascade_fullres"],
                       out_root=location.preprocessed)
    api.train(example_dataset, "3d_lowres", 0, overrides=QUICK, device="cpu", validate=False)
    splits = load_or_create_splits(location.preprocessed, [c.case_id for c in dataset.cases])
    lowres_folder = ModelFolder.for_run(location.results, "3d_lowres", plans.plans_name)
    for fold in range(len(splits)):
        target = lowres_folder.validation_dir(fold)
        target.mkdir(parents=True, exist_ok=True)
        for case_id in splits[fold]["val"]:
            shutil.copyfile(example_dataset / "labelsTr" / f"{case_id}.nii.gz", target / f"{case_id}.nii.gz")
    yield dataset, plans, location, root
    patch.undo()


def test_label_maps_go_onto_the_preprocessed_grid_and_back(cascade, example_dataset: Path) -> None:
    dataset, plans, location, _ = cascade
    case_id = dataset.cases[0].case_id
    label, _ = read_label(example_dataset / "labelsTr" / f"{case_id}.nii.gz")
    for name in ("3d_fullres", "3d_lowres"):
        config = plans.configurations[name]
        _, seg, properties, _ = read_case(location.preprocessed / config.data_id, case_id, mmap=False)
        grid = to_preprocessed_grid(label, properties, plans=plans, config=config)
        assert grid.shape == seg.shape == properties.shape
        assert np.mean(grid == np.maximum(seg, 0)) > 0.99  # as preprocessing resampled the label itself
        back = restore_label(grid, properties, plans=plans, config=config)
        assert back.shape == label.shape
        for value in (1, 2):  # both grids are resampled (fullres to the median spacing, lowres 2x coarser)
            dice = 2 * np.sum((back == value) & (label == value)) / (np.sum(back == value) + np.sum(label == value))
            assert dice > (0.95 if name == "3d_fullres" else 0.8)
    unresampled = dataclasses.replace(properties, spacing=properties.spacing_before_resample,
                                      shape=properties.shape_after_crop)
    grid = to_preprocessed_grid(label, unresampled, plans=plans, config=config)
    assert np.array_equal(restore_label(grid, unresampled, plans=plans, config=config), label)  # crop + transpose
    with pytest.raises(SettingsError, match="shape"):
        to_preprocessed_grid(label[:-1], properties, plans=plans, config=config)


def test_a_missing_lowres_fold_names_the_command(cascade, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dataset, plans, location, root = cascade
    shutil.copytree(root / "results", tmp_path / "results")
    monkeypatch.setenv("AUTOSEG_RESULTS", str(tmp_path / "results"))
    lowres = ModelFolder.for_run(location.results, "3d_lowres", plans.plans_name)
    next(lowres.validation_dir(2).glob("*.nii.gz")).unlink()
    with pytest.raises(SettingsError) as caught:
        previous_sources(location, dataset, plans, "3d_lowres")
    assert "fold(s) 2 of 3d_lowres" in caught.value.message
    assert f"autoseg train {dataset.name} 3d_lowres 2" in caught.value.hint
    with pytest.raises(SettingsError, match="fold"):
        api.train(Path(dataset.root), "3d_cascade_fullres", 0, overrides=QUICK, device="cpu")


@pytest.fixture(scope="module")
def trained(cascade):
    """Cascade fold 0 trained (which gathers the lowres predictions) and validated."""
    dataset, plans, location, _ = cascade
    folder = api.train(Path(dataset.root), "3d_cascade_fullres", 0, overrides=QUICK, device="cpu")
    return ModelFolder(folder)


def test_cascade_fold_trains_on_lowres_channels_and_validates(cascade, trained: ModelFolder) -> None:
    dataset, plans, location, _ = cascade
    run = fold_run(location, dataset, plans, "3d_cascade_fullres", 0)
    assert run.previous is not None and run.previous.values == (1, 2) and run.in_channels == 3
    weights = load_checkpoint(trained.checkpoint(0, "final"))["network"]
    first_conv = next(w for w in weights.values() if w.ndim == 5)
    assert first_conv.shape[1] == 3
    for case in dataset.cases:
        assert previous_file(run.cache, "3d_lowres", case.case_id).is_file()
    validation = trained.validation_dir(0)
    assert all((validation / f"{case_id}.nii.gz").is_file() for case_id in run.val_ids)
    assert (validation / "summary.json").is_file()
    stored = previous_file(run.cache, "3d_lowres", run.train_ids[0])
    written = stored.stat().st_mtime_ns
    api.train(Path(dataset.root), "3d_cascade_fullres", 0, overrides=QUICK, device="cpu", validate=False)
    assert stored.stat().st_mtime_ns == written  # up to date: not rewritten
    kept, = trained.fold_dir(0).glob("previous_run_*")  # the first run's validation, moved aside by the new run
    assert (kept / "validation" / "summary.json").is_file()


def test_loader_appends_untouched_one_hot_channels(cascade, trained: ModelFolder) -> None:
    dataset, plans, location, _ = cascade
    run = fold_run(location, dataset, plans, "3d_cascade_fullres", 0)
    source = BatchSource(run.cache, run.train_ids, run.config, batch_size=4, oversample=0.33, augmentation="default",
                         seed=5, deep_supervision=True, previous_dir=run.previous_dir, previous_values=(1, 2))
    source.augmentation = dataclasses.replace(source.augmentation, perturb_previous=False)
    agreement = []
    for index in range(12):  # intensity transforms fire on some of these 48 samples; none may reach the channels
        batch = source(index)
        assert batch["data"].shape == (4, 3, 16, 16, 16)
        channels = batch["data"][:, 1:]
        assert set(np.unique(channels)) <= {0.0, 1.0} and channels.sum(axis=1).max() <= 1
        # the fold's training cases have the reference labels as "lowres predictions": they move with the target
        agreement.append(np.mean(channels == one_hot(batch["target"][0][:, 0], (1, 2), axis=1)))
        assert batch["data"][:, 0].std() > 0
    assert np.mean(agreement) > 0.99
    source.augmentation = dataclasses.replace(source.augmentation, perturb_previous=True)
    batches = [source(index) for index in range(12)]
    perturbed = np.concatenate([batch["data"][:, 1:] for batch in batches])
    assert set(np.unique(perturbed)) <= {0.0, 1.0} and perturbed.sum(axis=1).max() <= 1
    targets = np.concatenate([one_hot(batch["target"][0][:, 0], (1, 2), axis=1) for batch in batches])
    assert np.mean(perturbed == targets) < np.mean(agreement)  # dilated, eroded, components removed


def test_perturbation_keeps_channels_binary_and_disjoint() -> None:
    rng = np.random.default_rng(0)
    seg = np.zeros((20, 20, 20), np.int16)
    seg[4:14, 4:14, 4:14], seg[7:10, 7:10, 7:10], seg[16:18, 16:18, 16:18] = 1, 2, 1
    channels = np.repeat(one_hot(seg, (1, 2))[None], 30, axis=0)
    perturb_previous(channels, rng)
    assert set(np.unique(channels)) <= {0.0, 1.0} and channels.sum(axis=1).max() <= 1
    changed = [not np.array_equal(sample, one_hot(seg, (1, 2))) for sample in channels]
    assert 5 < sum(changed) < 30


def test_predict_with_prev_stage_folder_and_chained(cascade, trained: ModelFolder, example_dataset: Path,
                                                    tmp_path: Path) -> None:
    dataset, plans, location, _ = cascade
    images = example_dataset / "imagesTs"
    lowres_out = tmp_path / "lowres"
    api.predict(images, lowres_out, dataset=example_dataset, configuration="3d_lowres", options=CPU)
    predictor = Predictor.from_folder(trained.root, CPU)
    with pytest.raises(SettingsError, match="needs the 3d_lowres"):
        predict_folder(predictor, images, tmp_path / "x")
    (lowres_out / "test_001.nii.gz").unlink()
    report = predict_folder(predictor, images, tmp_path / "given", previous_stage=lowres_out)
    assert report.written == ["test_000"] and list(report.failed) == ["test_001"]
    assert "previous-stage" in report.failed["test_001"]
    chained = api.predict(images, tmp_path / "chained", dataset=example_dataset, configuration="3d_cascade_fullres",
                          options=CPU)
    assert chained.written == ["test_000", "test_001"] and not chained.failed
    first, _ = read_label(tmp_path / "chained" / ".previous_3d_lowres" / "test_000.nii.gz")
    assert np.array_equal(first, read_label(lowres_out / "test_000.nii.gz")[0])
    same, _ = read_label(tmp_path / "given" / "test_000.nii.gz")
    assert np.array_equal(same, read_label(tmp_path / "chained" / "test_000.nii.gz")[0])
    label, geometry = read_label(lowres_out / "test_000.nii.gz")
    with pytest.raises(SettingsError, match="needs the 3d_lowres"):
        predictor.predict_files([images / "test_000_0000.nii.gz"])
    direct = predictor.predict_files([images / "test_000_0000.nii.gz"], previous=lowres_out / "test_000.nii.gz")
    assert np.array_equal(direct.labels, same)
    single_stage = Predictor.from_folder(ModelFolder.for_run(location.results, "3d_lowres", plans.plans_name).root, CPU)
    with pytest.raises(SettingsError, match="takes no previous"):
        single_stage.predict_files([images / "test_000_0000.nii.gz"], previous=lowres_out / "test_000.nii.gz")
    with pytest.raises(SettingsError, match="not a cascade stage"):
        predict_folder(single_stage, images, tmp_path / "y", previous_stage=lowres_out)
    write_label(label, geometry, tmp_path / "cli_prev" / "test_000.nii.gz")
    result = CliRunner().invoke(app, ["predict", "-i", str(images), "-o", str(tmp_path / "cli"), "-m",
                                      str(trained.root), "--device", "cpu", "--no-tta", "--prev-stage",
                                      str(tmp_path / "cli_prev")])
    assert result.exit_code == 1 and "test_001" in result.output and (tmp_path / "cli" / "test_000.nii.gz").is_file()


def test_a_cascade_archive_brings_its_first_stage_and_predicts_the_same(cascade, trained: ModelFolder,
                                                                       example_dataset: Path, tmp_path: Path) -> None:
    from autoseg.sharing import export_model

    dataset, plans, location, _ = cascade
    manifest = export_model(location.results, tmp_path / "cascade.zip", configurations=["3d_cascade_fullres"])
    assert [m.configuration for m in manifest.models] == ["3d_lowres", "3d_cascade_fullres"]
    images = example_dataset / "imagesTs"
    api.predict(images, tmp_path / "folder", dataset=example_dataset, configuration="3d_cascade_fullres", options=CPU)
    api.predict(images, tmp_path / "zip", model=tmp_path / "cascade.zip", configuration="3d_cascade_fullres",
                options=CPU)
    for name in ("test_000.nii.gz", "test_001.nii.gz"):
        assert np.array_equal(read_label(tmp_path / "folder" / name)[0], read_label(tmp_path / "zip" / name)[0])
