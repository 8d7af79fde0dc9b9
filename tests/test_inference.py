"""Prediction from a model folder: files land on the input's geometry, bad cases fail alone, API on arrays."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from model_builders import make_model_folder

from autoseg.errors import SettingsError
from autoseg.inference import PredictOptions, Predictor, find_input_cases, predict_folder, read_prediction_info
from autoseg.inference.export import LabelSemantics, probabilities_to_labels, restore_prediction
from autoseg.io.geometry import Geometry
from autoseg.io.readers import read_header, read_images, read_label, write_image
from autoseg.model_folder import CheckpointError, ModelFolder
from autoseg.preprocessing.case import preprocess_arrays
from autoseg.preprocessing.contract import CaseProperties


@pytest.fixture(scope="module")
def model(example_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelFolder:
    return make_model_folder(tmp_path_factory.mktemp("models"), example_dataset, folds=(0, 1))


def _same_geometry(a: Geometry, b: Geometry) -> bool:
    return a.shape == b.shape and np.allclose(a.file_spacing, b.file_spacing) and np.allclose(
        a.origin, b.origin) and np.allclose(a.direction, b.direction, atol=1e-6)


def test_predicted_files_match_the_inputs_geometry(model: ModelFolder, example_dataset: Path, tmp_path: Path):
    predictor = Predictor.from_folder(model.root)
    assert predictor.folds == ("0", "1") and predictor.window.mirror_axes == (0, 1, 2)
    report = predict_folder(predictor, example_dataset / "imagesTs", tmp_path, save_probabilities=True)
    assert report.written == ["test_000", "test_001"] and not report.failed
    for case_id in report.written:
        label_geometry, _ = read_header(tmp_path / f"{case_id}.nii.gz")
        image_geometry, _ = read_header(example_dataset / "imagesTs" / f"{case_id}_0000.nii.gz")
        assert _same_geometry(label_geometry, image_geometry)
        with np.load(tmp_path / f"{case_id}.npz") as stored:
            probabilities = stored["probabilities"].astype(np.float32)
        labels, _ = read_label(tmp_path / f"{case_id}.nii.gz")
        assert probabilities.shape == (3, *labels.shape)
        np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=2e-3)
        agree = probabilities.argmax(axis=0) == labels
        assert agree.mean() > 0.999  # float16 storage may flip exact ties
    info = read_prediction_info(tmp_path)
    assert info.folds == ("0", "1") and info.probabilities and info.region_values is None


def test_existing_outputs_are_skipped_unless_overwrite(model: ModelFolder, example_dataset: Path, tmp_path: Path):
    predictor = Predictor.from_folder(model.root, PredictOptions(folds=("0",), tta=False))
    predict_folder(predictor, example_dataset / "imagesTs", tmp_path)
    before = (tmp_path / "test_000.nii.gz").stat().st_mtime_ns
    again = predict_folder(predictor, example_dataset / "imagesTs", tmp_path)
    assert again.skipped == ["test_000", "test_001"] and not again.written
    assert (tmp_path / "test_000.nii.gz").stat().st_mtime_ns == before
    redone = predict_folder(predictor, example_dataset / "imagesTs", tmp_path, overwrite=True)
    assert redone.written == ["test_000", "test_001"]
    both = Predictor.from_folder(model.root, PredictOptions(folds=("0", "1"), tta=False))
    with pytest.raises(SettingsError, match=r"already holds predictions of .*folds 0\), not of this model"):
        predict_folder(both, example_dataset / "imagesTs", tmp_path)  # issue 19 D5: no silent mix of models
    assert read_prediction_info(tmp_path).folds == ("0",)
    assert predict_folder(both, example_dataset / "imagesTs", tmp_path, overwrite=True).written
    assert read_prediction_info(tmp_path).folds == ("0", "1")


def test_parts_predict_disjoint_shares_and_a_last_whole_run_only_checks(model: ModelFolder, example_dataset: Path,
                                                                       tmp_path: Path) -> None:
    from autoseg.runtime.parts import Part

    predictor = Predictor.from_folder(model.root, PredictOptions(folds=("0",), tta=False))
    first = predict_folder(predictor, example_dataset / "imagesTs", tmp_path, part=Part(1, 2))
    assert first.written == ["test_000"] and not (tmp_path / "test_001.nii.gz").exists()
    second = predict_folder(predictor, example_dataset / "imagesTs", tmp_path, part=Part(2, 2))
    assert second.written == ["test_001"] and not second.skipped
    last = predict_folder(predictor, example_dataset / "imagesTs", tmp_path)
    assert last.skipped == ["test_000", "test_001"] and not last.written and not last.failed


def test_a_rerun_with_every_case_written_reads_no_checkpoint(model: ModelFolder, example_dataset: Path,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final check after a `--part` array must not load five folds' weights only to skip every case."""
    import autoseg.inference.predictor as predictor_module

    options = PredictOptions(folds=("0",), tta=False)
    predict_folder(Predictor.from_folder(model.root, options), example_dataset / "imagesTs", tmp_path)
    loads: list[str] = []
    real_load = predictor_module.load_fold_network
    monkeypatch.setattr(predictor_module, "load_fold_network", lambda *a, **k: loads.append(a[1]) or real_load(*a, **k))
    checked = predict_folder(Predictor.from_folder(model.root, options), example_dataset / "imagesTs", tmp_path)
    assert checked.skipped == ["test_000", "test_001"] and loads == []
    (tmp_path / "test_001.nii.gz").unlink()
    redone = predict_folder(Predictor.from_folder(model.root, options), example_dataset / "imagesTs", tmp_path)
    assert redone.written == ["test_001"] and loads == ["0"]


def test_a_broken_checkpoint_is_one_error_not_a_failure_per_case(model: ModelFolder, example_dataset: Path,
                                                                 tmp_path: Path) -> None:
    broken = tmp_path / "model" / model.root.name
    shutil.copytree(model.root, broken)
    (broken / "fold_0" / "checkpoint_final.pt").write_bytes(b"not a checkpoint")
    predictor = Predictor.from_folder(broken, PredictOptions(folds=("0",), tta=False))
    with pytest.raises(CheckpointError):
        predict_folder(predictor, example_dataset / "imagesTs", tmp_path / "out")


OBLIQUE = (0.0, -1.0, 0.0, 0.8, 0.0, -0.6, 0.6, 0.0, 0.8)  # rotated and with a flipped axis (not RAS)


@pytest.mark.parametrize("ending", [".nii.gz", ".mha", ".nrrd"])
def test_oblique_non_ras_inputs_keep_their_geometry(model: ModelFolder, example_dataset: Path, tmp_path: Path,
                                                    ending: str) -> None:
    images, geometry = read_images([example_dataset / "imagesTs" / "test_000_0000.nii.gz"])
    oblique = Geometry(shape=geometry.shape, file_spacing=(0.9, 1.3, 2.1), origin=(-12.5, 40.0, 7.25),
                       direction=OBLIQUE)
    source = tmp_path / "in" / f"scan_0000{ending}"
    write_image(images[0], oblique, source)
    predictor = Predictor.from_folder(model.root, PredictOptions(folds=("0",), tta=False))
    report = predict_folder(predictor, source, tmp_path / "out")
    assert report.written == ["scan"]
    written, _ = read_header(tmp_path / "out" / f"scan{ending}")
    assert _same_geometry(written, read_header(source)[0])


def test_bad_cases_fail_alone_with_clear_messages(model: ModelFolder, example_dataset: Path, tmp_path: Path):
    source = tmp_path / "in"
    source.mkdir()
    good = example_dataset / "imagesTs" / "test_000_0000.nii.gz"
    shutil.copy(good, source / "good_0000.nii.gz")
    (source / "broken_0000.nii.gz").write_bytes(good.read_bytes()[:200])
    shutil.copy(good, source / "wrongchannel_0001.nii.gz")
    (array,), geometry = read_images([good])
    array[::10] = np.nan  # a tenth of the slices: normalisation would make the whole scan NaN (issue 19 D2)
    write_image(array, geometry, source / "holes_0000.nii.gz")
    predictor = Predictor.from_folder(model.root, PredictOptions(folds=("0",), tta=False))
    report = predict_folder(predictor, source, tmp_path / "out")
    assert report.written == ["good"]
    assert set(report.failed) == {"broken", "wrongchannel", "holes"}
    assert "broken_0000.nii.gz" in report.failed["broken"]
    assert "missing channel(s) [0]" in report.failed["wrongchannel"]
    assert "NaN or infinite" in report.failed["holes"] and "channel 0" in report.failed["holes"]
    assert not (tmp_path / "out" / "holes.nii.gz").exists()


def test_a_two_d_file_for_a_three_d_model_is_a_clear_error(model: ModelFolder, tmp_path: Path) -> None:
    flat = Geometry(shape=(1, 30, 30), file_spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0))
    write_image(np.zeros((1, 30, 30), np.float32), flat, tmp_path / "in" / "flat_0000.nii.gz")
    predictor = Predictor.from_folder(model.root, PredictOptions(folds=("0",), tta=False))
    report = predict_folder(predictor, tmp_path / "in", tmp_path / "out")
    assert "flat" in report.failed


def test_array_api_and_streamed_export_agree(model: ModelFolder, example_dataset: Path) -> None:
    predictor = Predictor.from_folder(model.root, PredictOptions(tta=False))
    images, geometry = read_images([example_dataset / "imagesTs" / "test_001_0000.nii.gz"])
    by_spacing = predictor.predict(images[0], spacing=geometry.array_spacing)
    full = predictor.predict(images, geometry=geometry, with_probabilities=True)
    assert by_spacing.labels.shape == images.shape[1:]
    assert np.array_equal(by_spacing.labels, full.labels)
    assert np.array_equal(full.labels, probabilities_to_labels(full.probabilities, predictor.semantics))


def test_export_restores_the_input_grid_from_an_anisotropic_resample(model: ModelFolder, example_dataset: Path):
    predictor = Predictor.from_folder(model.root, PredictOptions(folds=("0",), tta=False))
    images, geometry = read_images([example_dataset / "imagesTs" / "test_000_0000.nii.gz"])
    coarse = dataclasses.replace(geometry, file_spacing=(geometry.file_spacing[0], geometry.file_spacing[1], 4.0))
    prepared = preprocess_arrays(images, None, coarse, plans=predictor.plans, config=predictor.config)
    properties = CaseProperties("x", coarse, tuple(images.shape[1:]), prepared.box, prepared.spacing_before_resample,
                                prepared.shape_after_crop, prepared.spacing, tuple(prepared.seg.shape), (), "")
    logits = np.random.default_rng(0).normal(size=(3, *prepared.data.shape[1:])).astype(np.float32)
    streamed, _ = restore_prediction(logits, properties, plans=predictor.plans, config=predictor.config,
                                     semantics=predictor.semantics)
    stacked, probabilities = restore_prediction(logits, properties, plans=predictor.plans, config=predictor.config,
                                                semantics=predictor.semantics, with_probabilities=True)
    assert streamed.shape == images.shape[1:] and probabilities.shape == (3, *images.shape[1:])
    assert (streamed == stacked).mean() > 0.999


def test_region_semantics_write_nested_regions_in_order() -> None:
    from autoseg.dataset.contract import Dataset, LabelDef

    labels = (LabelDef("background", (0,)), LabelDef("whole", (1, 2, 3)), LabelDef("core", (2, 3)),
              LabelDef("enhancing", (3,)))
    dataset = Dataset("x", "/", ("T1",), labels, ".nii.gz", 0, ())
    semantics = LabelSemantics.from_dataset(dataset)
    assert semantics.region_values == (1, 2, 3)
    probabilities = np.zeros((3, 4), np.float32)
    probabilities[0, 1:] = 0.9
    probabilities[1, 2:] = 0.9
    probabilities[2, 3] = 0.9
    assert probabilities_to_labels(probabilities, semantics).tolist() == [0, 1, 2, 3]


def test_two_d_model_predicts_a_volume_slice_by_slice(example_dataset: Path, tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path, example_dataset, "2d")
    predictor = Predictor.from_folder(folder.root, PredictOptions(tta=False))
    images, geometry = read_images([example_dataset / "imagesTs" / "test_000_0000.nii.gz"])
    assert predictor.predict(images, geometry=geometry).labels.shape == images.shape[1:]


def test_missing_checkpoints_and_folders_are_clear_errors(model: ModelFolder, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="plans.json"):
        Predictor.from_folder(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint_best"):
        Predictor.from_folder(model.root, PredictOptions(checkpoint="best"))


def test_precision_flag_chooses_the_autocast_dtype(model: ModelFolder) -> None:
    """--precision bf16 is the newer spelling of --cpu-bf16; auto is fp32 on CPU (issue 16)."""
    assert Predictor.from_folder(model.root, PredictOptions(folds=("0",))).amp is None
    assert Predictor.from_folder(model.root, PredictOptions(folds=("0",), precision="bf16")).amp is torch.bfloat16
    assert Predictor.from_folder(model.root, PredictOptions(folds=("0",), cpu_bf16=True)).amp is torch.bfloat16
    assert Predictor.from_folder(model.root, PredictOptions(folds=("0",), precision="bf16", amp=False)).amp is None


def test_input_cases_are_grouped_by_channel(tmp_path: Path) -> None:
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.mha", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    cases = find_input_cases(tmp_path, 2)
    assert [(c.case_id, c.channels, c.ending) for c in cases] == [("a", (0, 1), ".nii.gz"), ("b", (0,), ".mha")]
    assert os.path.basename(cases[0].files[1]) == "a_0001.nii.gz"


def test_cpu_bf16_is_an_opt_in_that_stays_close(model: ModelFolder, example_dataset: Path) -> None:
    images, geometry = read_images([example_dataset / "imagesTs" / "test_000_0000.nii.gz"])
    exact = Predictor.from_folder(model.root, PredictOptions(folds=("0",), tta=False))
    fast = Predictor.from_folder(model.root, PredictOptions(folds=("0",), tta=False, cpu_bf16=True))
    assert exact.amp is None and fast.amp == torch.bfloat16
    agree = exact.predict(images, geometry=geometry).labels == fast.predict(images, geometry=geometry).labels
    assert agree.mean() > 0.9


def test_a_folder_with_only_best_checkpoints_predicts_with_them(model: ModelFolder, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(model.root, tmp_path / model.root.name))
    for final in copy.glob("fold_*/checkpoint_final.pt"):
        final.rename(final.with_name("checkpoint_best.pt"))
    predictor = Predictor.from_folder(copy, PredictOptions(tta=False))
    best = sorted(p.parent.name.removeprefix("fold_") for p in copy.glob("fold_*/checkpoint_best.pt"))
    assert predictor.folds == tuple(best)
    first = next(iter(copy.glob("fold_*/checkpoint_best.pt")))
    shutil.copy(first, first.with_name("checkpoint_latest.pt"))  # two kinds: no guessing, a clear error
    with pytest.raises(CheckpointError, match="checkpoint_final"):
        Predictor.from_folder(copy, PredictOptions(tta=False))


def test_a_folder_never_keeps_the_scans_it_has_predicted(model: ModelFolder, example_dataset: Path,
                                                         tmp_path: Path) -> None:
    """Issue 18: the reader used to keep every case's images referenced until the folder was done."""
    import gc
    import weakref
    from concurrent.futures import ThreadPoolExecutor

    from autoseg.inference.run import _prefetch

    for index in range(4):
        shutil.copy(example_dataset / "imagesTs" / "test_000_0000.nii.gz", tmp_path / f"case{index}_0000.nii.gz")
    predictor = Predictor.from_folder(model.root, PredictOptions(folds=("0",), tta=False))
    todo = [(case, tmp_path / "out" / case.case_id) for case in find_input_cases(tmp_path, 1)]
    seen = []
    with ThreadPoolExecutor(1) as reader:
        for _, future in _prefetch(reader, todo, predictor, None):
            seen.append(weakref.ref(future.result()[0]))
            del future
            gc.collect()
            assert sum(ref() is not None for ref in seen) <= 2  # this case and the one being read
    assert len(seen) == 4
