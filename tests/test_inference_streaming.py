"""Streamed export (issue 18): labels decided slab by slab equal the whole-volume export, on any grid."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_builders import make_model_folder

from autoseg.inference import PredictOptions, Predictor
from autoseg.inference.export import LabelSemantics, restore_prediction
from autoseg.inference.streaming import StreamedLabels
from autoseg.io.readers import read_images
from autoseg.preprocessing.case import preprocess_arrays
from autoseg.preprocessing.contract import CaseProperties
from autoseg.preprocessing.resample import resample_probabilities
from autoseg.preprocessing.resample_rows import RowResampler


@pytest.fixture(scope="module")
def predictor(example_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    model = make_model_folder(tmp_path_factory.mktemp("models"), example_dataset, folds=(0,))
    return Predictor.from_folder(model.root, PredictOptions(tta=False))


@pytest.fixture(scope="module")
def scan(example_dataset: Path):
    return read_images([example_dataset / "imagesTs" / "test_000_0000.nii.gz"])


def _properties(predictor: Predictor, images: np.ndarray, geometry) -> tuple[CaseProperties, tuple[int, ...]]:
    prepared = preprocess_arrays(images, None, geometry, plans=predictor.plans, config=predictor.config)
    properties = CaseProperties("x", geometry, tuple(images.shape[1:]), prepared.box, prepared.spacing_before_resample,
                                prepared.shape_after_crop, prepared.spacing, tuple(prepared.seg.shape), (), "")
    return properties, tuple(prepared.data.shape[1:])


@settings(max_examples=12, deadline=None)
@given(spacing=st.tuples(*[st.sampled_from([0.5, 1.0, 1.7, 4.0])] * 3), classes=st.integers(2, 5),
       cuts=st.lists(st.integers(1, 9), min_size=1, max_size=12), regions=st.booleans())
def test_streamed_labels_equal_the_whole_volume_export(predictor: Predictor, scan, spacing, classes, cuts,
                                                       regions) -> None:
    images, geometry = scan
    properties, grid = _properties(predictor, images, dataclasses.replace(geometry, file_spacing=spacing))
    logits = np.random.default_rng(len(cuts)).normal(size=(classes, *grid)).astype(np.float32)
    semantics = LabelSemantics(tuple(range(1, classes + 1))) if regions else LabelSemantics()
    reference, _ = restore_prediction(logits, properties, plans=predictor.plans, config=predictor.config,
                                      semantics=semantics)
    streamed = StreamedLabels(grid, properties, plans=predictor.plans, config=predictor.config, semantics=semantics,
                              num_classes=classes)
    start = 0
    for cut in [*cuts, grid[0]]:  # slabs of arbitrary sizes, the last one taking the rest
        stop = min(start + cut, grid[0])
        if stop > start:
            streamed.add(start, logits[:, start:stop])
        start = stop
    labels = streamed.finish()
    assert labels.shape == images.shape[1:] and labels.dtype == reference.dtype
    assert np.array_equal(labels, reference)


def test_rows_arrive_in_order_or_the_export_says_so(predictor: Predictor, scan) -> None:
    images, geometry = scan
    properties, grid = _properties(predictor, images, geometry)
    streamed = StreamedLabels(grid, properties, plans=predictor.plans, config=predictor.config,
                              semantics=LabelSemantics(), num_classes=3)
    with pytest.raises(ValueError, match="row order"):
        streamed.add(2, np.zeros((3, 1, *grid[1:]), np.float32))
    streamed.add(0, np.zeros((3, 1, *grid[1:]), np.float32))
    with pytest.raises(ValueError, match="rows of logits arrived"):
        streamed.finish()


@pytest.mark.parametrize("order, order_z, axis", [(1, 0, None), (1, 0, 0), (3, 0, 0), (1, 1, 0), (3, 0, None),
                                                  (1, 0, 2)])
@pytest.mark.parametrize("new_shape", [(37, 41, 18), (9, 30, 25), (47, 13, 25), (20, 30, 25)])
def test_row_resampling_equals_the_whole_volume(order, order_z, axis, new_shape) -> None:
    shape = (20, 30, 25)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    reference = resample_probabilities(x[None], new_shape, order=order, order_z=order_z, separate_axis=axis)[0]
    resampler = RowResampler(shape, new_shape, order=order, order_z=order_z, separate_axis=axis)
    out, needed = np.zeros(new_shape, np.float32), []
    for start in range(0, new_shape[0], 5):
        stop = min(start + 5, new_shape[0])
        low, high = resampler.rows_needed(start, stop)
        needed.append(high - low)
        out[start:stop] = resampler.resample(x[low:high], low, start, stop)
    exact = RowResampler.is_exact(shape, new_shape, order=order, separate_axis=axis)
    assert exact == (order == 1 or axis == 0 or new_shape == shape)
    if exact:
        np.testing.assert_array_equal(out, reference)
    else:  # the range clip of a spline spans axis 0: the predictor exports such plans from the whole volume
        assert np.abs(out - reference).max() < 0.5
    if order <= 1 or axis == 0:  # local taps: a few rows of input per 5 rows of output, not the volume
        assert max(needed) <= 5 * shape[0] / new_shape[0] + 3
    assert resampler.rows_ready(shape[0]) == new_shape[0]
    with pytest.raises(ValueError, match="need input rows"):
        resampler.resample(x[:1], 0, new_shape[0] - 1, new_shape[0])


def test_the_predictor_streams_and_agrees_with_the_probability_path(predictor: Predictor, scan) -> None:
    images, geometry = scan
    streamed = predictor.predict(images, geometry=geometry)
    full = predictor.predict(images, geometry=geometry, with_probabilities=True)
    assert streamed.probabilities is None and streamed.labels.shape == images.shape[1:]
    assert (streamed.labels == full.labels).mean() > 0.9999


@settings(max_examples=6, deadline=None)
@given(spacing=st.tuples(*[st.sampled_from([0.7, 1.0, 4.0])] * 3), regions=st.booleans())
def test_streamed_probability_file_equals_the_in_memory_probabilities(predictor: Predictor, scan, tmp_path_factory,
                                                                       spacing, regions) -> None:
    from autoseg.inference.probability_file import ProbabilityFile

    images, geometry = scan
    properties, grid = _properties(predictor, images, dataclasses.replace(geometry, file_spacing=spacing))
    logits = np.random.default_rng(7).normal(size=(4, *grid)).astype(np.float32)
    semantics = LabelSemantics((1, 2, 3, 4)) if regions else LabelSemantics()
    labels_ref, reference = restore_prediction(logits, properties, plans=predictor.plans, config=predictor.config,
                                               semantics=semantics, with_probabilities=True)
    target = tmp_path_factory.mktemp("npz") / "case.npz"
    sink = ProbabilityFile(target, properties, plans=predictor.plans, classes=4, background_outside=not regions)
    streamed = StreamedLabels(grid, properties, plans=predictor.plans, config=predictor.config, semantics=semantics,
                              num_classes=4, probabilities=sink)
    for start in range(0, grid[0], 3):
        streamed.add(start, logits[:, start:start + 3])
    labels = streamed.finish()
    with np.load(target) as stored:
        written = stored["probabilities"]
    assert written.dtype == np.float16 and written.shape == reference.shape
    np.testing.assert_allclose(written.astype(np.float32), reference, atol=1e-3)
    assert (labels == labels_ref).mean() > 0.999  # decisions on logits vs on probabilities: exact ties aside
    assert sorted(p.name for p in target.parent.iterdir()) == ["case.npz"]  # no scratch file left


def test_folder_prediction_streams_probabilities_into_the_npz(predictor: Predictor, example_dataset: Path,
                                                              tmp_path: Path) -> None:
    from autoseg.inference import predict_folder

    predict_folder(predictor, example_dataset / "imagesTs", tmp_path, save_probabilities=True)
    images, geometry = read_images([example_dataset / "imagesTs" / "test_000_0000.nii.gz"])
    in_memory = predictor.predict(images, geometry=geometry, with_probabilities=True)
    with np.load(tmp_path / "test_000.npz") as stored:
        written = stored["probabilities"].astype(np.float32)
    np.testing.assert_allclose(written, in_memory.probabilities, atol=1e-3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_accumulator_option_is_checked_and_reaches_the_window(predictor: Predictor) -> None:
    from autoseg.errors import SettingsError

    half = Predictor.from_folder(predictor.source, PredictOptions(tta=False, accumulator="float16"))
    assert half.window.accumulator == "float16"
    with pytest.raises(SettingsError, match="unknown accumulator"):
        Predictor.from_folder(predictor.source, PredictOptions(accumulator="float8"))
