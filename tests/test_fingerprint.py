"""Fingerprint statistics against values computed by hand on constructed volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autoseg.dataset.contract import Case, Dataset, LabelDef
from autoseg.fingerprint import analyse_case, dataset_hash, extract_fingerprint
from autoseg.fingerprint.extract import nonzero_bounding_box
from autoseg.fingerprint.intensity import intensity_stats, sample_foreground
from autoseg.io import Geometry, write_image


def _write_case(folder: Path, case_id: str, image: np.ndarray, label: np.ndarray,
                spacing_xyz: tuple[float, float, float]) -> Case:
    geometry = Geometry(shape=image.shape, file_spacing=spacing_xyz, origin=(0.0, 0.0, 0.0),
                        direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    image_path = folder / "imagesTr" / f"{case_id}_0000.nii.gz"
    label_path = folder / "labelsTr" / f"{case_id}.nii.gz"
    write_image(image, geometry, image_path)
    write_image(label.astype(np.uint8), geometry, label_path)
    return Case(case_id, (str(image_path),), str(label_path))


def _dataset(folder: Path, cases: list[Case]) -> Dataset:
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}}))
    return Dataset(name=folder.name, root=str(folder), channel_names=("MRI",),
                   labels=(LabelDef("background", (0,)), LabelDef("a", (1,))),
                   file_ending=".nii.gz", num_training=len(cases), cases=tuple(cases))


@pytest.fixture()
def constructed(tmp_path: Path) -> Dataset:
    """Two cases: zero border around a non-zero block, foreground of constant known values."""
    image_a = np.zeros((10, 12, 14), np.float32)
    image_a[2:8, 3:9, 4:10] = 5.0
    label_a = np.zeros_like(image_a, dtype=np.uint8)
    label_a[3:5, 4:6, 5:7] = 1
    image_a[label_a == 1] = 100.0
    image_b = np.full((8, 8, 8), 7.0, np.float32)
    label_b = np.zeros_like(image_b, dtype=np.uint8)
    label_b[0:2, 0:2, 0:2] = 1
    image_b[label_b == 1] = 300.0
    cases = [_write_case(tmp_path, "a", image_a, label_a, (0.5, 0.7, 2.0)),
             _write_case(tmp_path, "b", image_b, label_b, (1.0, 1.0, 1.0))]
    return _dataset(tmp_path, cases)


def test_case_analysis_matches_hand_computation(constructed: Dataset) -> None:
    fp, samples = analyse_case(constructed.cases[0], samples=50)
    assert fp.spacing == pytest.approx((2.0, 0.7, 0.5))  # file (x, y, z) -> array (z, y, x)
    assert fp.shape == (10, 12, 14)
    assert fp.shape_after_crop == (6, 6, 6)
    assert fp.relative_size_after_crop == pytest.approx(216 / (10 * 12 * 14))
    assert samples.shape == (1, 50) and np.all(samples == 100.0)


def test_every_case_weighs_the_same_in_the_pooled_statistics(constructed: Dataset) -> None:
    fingerprint = extract_fingerprint(constructed, total_samples=2000)
    stats = fingerprint.intensity[0]
    assert fingerprint.samples_per_case == 1000
    assert stats.mean == pytest.approx(200.0)  # half the samples 100, half 300
    assert stats.min == 100.0 and stats.max == 300.0
    assert stats.std == pytest.approx(100.0)
    assert stats.percentile_00_5 == 100.0 and stats.percentile_99_5 == 300.0
    assert fingerprint.median_relative_size_after_crop == pytest.approx((216 / 1680 + 1.0) / 2)


def test_parallel_and_serial_extraction_agree(constructed: Dataset) -> None:
    serial = extract_fingerprint(constructed, total_samples=400, workers=1)
    parallel = extract_fingerprint(constructed, total_samples=400, workers=2)
    assert serial == parallel


def test_hash_changes_when_a_file_changes(constructed: Dataset) -> None:
    before = dataset_hash(constructed)
    Path(constructed.cases[1].label).write_bytes(Path(constructed.cases[0].label).read_bytes())
    assert dataset_hash(constructed) != before


def test_bounding_box_of_empty_and_full_images() -> None:
    assert nonzero_bounding_box(np.zeros((1, 3, 4, 5))) == ((0, 3), (0, 4), (0, 5))
    image = np.zeros((2, 5, 5, 5))
    image[1, 1, 2, 3] = 1
    image[0, 3, 0, 3] = -1
    assert nonzero_bounding_box(image) == ((1, 4), (0, 3), (3, 4))


def test_sampling_without_foreground_and_stats_of_nothing() -> None:
    rng = np.random.default_rng(0)
    drawn = sample_foreground(np.ones((2, 3, 3, 3)), np.zeros((3, 3, 3), bool), 10, rng)
    assert drawn.shape == (2, 0)
    assert np.isnan(intensity_stats(drawn[0]).mean)


@pytest.mark.realdata
def test_real_dataset_fingerprint(real_dataset: Path) -> None:
    from autoseg.dataset.load import load_dataset

    fingerprint = extract_fingerprint(load_dataset(real_dataset), workers=2)
    assert len(fingerprint.cases) == 195
    assert all(case.spacing == (1.0, 1.0, 1.0) for case in fingerprint.cases)
    median = np.median(np.asarray(fingerprint.shapes_after_crop), axis=0)
    assert tuple(median) == (36, 50, 35)
    stats = fingerprint.intensity[0]
    assert stats.min <= stats.percentile_00_5 <= stats.median <= stats.percentile_99_5 <= stats.max


def test_label_of_another_shape_is_a_clear_error(constructed: Dataset) -> None:
    from autoseg.errors import DatasetError

    broken = Case("a", constructed.cases[0].images, constructed.cases[1].label)
    with pytest.raises(DatasetError, match="label shape") as err:
        analyse_case(broken, samples=10)
    assert "autoseg check" in err.value.hint
