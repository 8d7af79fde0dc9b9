"""Cropping round-trips exactly; normalisation schemes match hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from autoseg.errors import SettingsError
from autoseg.fingerprint.contract import IntensityStats
from autoseg.preprocessing.crop import OUTSIDE, crop_to_nonzero, uncrop
from autoseg.preprocessing.normalize import normalize

STATS = IntensityStats(mean=10.0, std=2.0, median=10.0, min=0.0, max=30.0,
                       percentile_00_5=4.0, percentile_99_5=20.0)


@settings(max_examples=40, deadline=None)
@given(arrays(np.int8, st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)),
              elements=st.integers(-2, 2)))
def test_uncrop_restores_the_image_exactly(volume: np.ndarray) -> None:
    images = volume[None].astype(np.float32)
    label = (volume > 0).astype(np.uint8)
    cropped, cropped_label, box = crop_to_nonzero(images, label)
    assert np.array_equal(uncrop(cropped, box, volume.shape), images)
    restored = uncrop(cropped_label, box, volume.shape, fill=OUTSIDE)
    assert np.array_equal(np.where(restored == OUTSIDE, 0, restored), label)


def test_crop_box_and_outside_marking() -> None:
    images = np.zeros((2, 6, 7, 8), np.float32)
    images[0, 1:5, 2:6, 3:7] = 1.0  # a hollow shell: the hole is inside the body
    images[0, 2:4, 3:5, 4:6] = 0.0
    images[1, 5, 6, 7] = 3.0  # a second channel extends the box
    label = np.zeros((6, 7, 8), np.uint8)
    label[2, 3, 4] = 2
    cropped, cropped_label, box = crop_to_nonzero(images, label)
    assert box == ((1, 6), (2, 7), (3, 8))
    assert cropped.shape == (2, 5, 5, 5)
    assert cropped_label[1, 1, 1] == 2  # labels survive
    assert cropped_label[1, 1, 2] == 0  # the filled hole counts as inside
    assert cropped_label[4, 0, 0] == OUTSIDE  # zero in every channel and not enclosed


def test_ct_scheme_clips_then_standardises() -> None:
    x = np.array([[[0.0, 4.0, 10.0, 20.0, 100.0]]], np.float32)
    out = normalize(x[None], schemes=("ct",), use_mask=(False,), intensity=(STATS,))
    assert np.allclose(out[0, 0, 0], [-3.0, -3.0, 0.0, 5.0, 5.0])


def test_zscore_with_and_without_mask() -> None:
    x = np.array([[[0.0, 0.0, 2.0, 4.0, 6.0]]], np.float32)
    body = x > 0
    plain = normalize(x[None], schemes=("zscore",), use_mask=(False,), intensity=(STATS,))
    assert abs(plain.mean()) < 1e-6 and abs(plain.std() - 1) < 1e-5
    masked = normalize(x[None], schemes=("zscore",), use_mask=(True,), intensity=(STATS,), body=body)
    expected = (np.array([2.0, 4.0, 6.0]) - 4.0) / np.std([2.0, 4.0, 6.0])
    assert np.allclose(masked[0, 0, 0, 2:], expected) and np.all(masked[0, 0, 0, :2] == 0)


def test_other_schemes_and_unknown_name() -> None:
    x = np.array([[[0.0, 51.0, 255.0]]], np.float32)[None]
    assert np.allclose(normalize(x, schemes=("rescale01",), use_mask=(False,), intensity=(STATS,)),
                       [0.0, 0.2, 1.0])
    assert np.allclose(normalize(x, schemes=("rgb01",), use_mask=(False,), intensity=(STATS,)), [0.0, 0.2, 1.0])
    assert np.array_equal(normalize(x, schemes=("none",), use_mask=(False,), intensity=(STATS,)), x)
    with pytest.raises(SettingsError, match="did you mean 'zscore'"):
        normalize(x, schemes=("zscor",), use_mask=(False,), intensity=(STATS,))
