"""Resampling equals nnU-Net's: skimage's order-3 resize for images, per-label linear resize for labels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from autoseg.errors import SettingsError
from autoseg.preprocessing.resample import (
    compute_new_shape,
    resample_image,
    resample_label,
    resample_probabilities,
    separate_axis,
)

SHAPE_PAIRS = [((17, 23, 11), (31, 12, 11)), ((9, 14, 20), (21, 33, 7)), ((1, 13, 6), (4, 7, 15))]


def smooth_volume(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (100 * ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) + 40).astype(np.float32)


def blob_labels(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Smooth random blobs with labels -1..3 (argmax of 5 smoothed noise fields)."""
    rng = np.random.default_rng(seed)
    fields = ndimage.gaussian_filter(rng.standard_normal((5, *shape)), (0, 1.2, 1.2, 1.2))
    return (np.argmax(fields, axis=0) - 1).astype(np.int16)


def source_grid(old: tuple[int, ...], new: tuple[int, ...]) -> list[np.ndarray]:
    """Input coordinates of the output voxel centres (half-pixel centres), one array per axis."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in new], indexing="ij")
    return [(o / n) * (g + 0.5) - 0.5 for o, n, g in zip(old, new, grids)]


def reference_labels(seg: np.ndarray, new: tuple[int, ...]) -> np.ndarray:
    """Slow per-label reference: linear resize of each binary mask, >= 0.5, ascending labels."""
    out = np.zeros(new, dtype=seg.dtype)
    coords = source_grid(seg.shape, new)
    for value in np.unique(seg):
        mask = ndimage.map_coordinates((seg == value).astype(np.float64), coords, order=1, mode="nearest")
        out[mask >= 0.5] = value
    return out


def reference_separate(seg: np.ndarray, new: tuple[int, ...], axis: int, order_z: int = 0) -> np.ndarray:
    """nnU-Net's separate z for labels: per-label linear slice by slice, then `order_z` along `axis`."""
    plane = tuple(n for a, n in enumerate(new) if a != axis)
    slices = [reference_labels(np.take(seg, i, axis=axis), plane) for i in range(seg.shape[axis])]
    stacked = np.stack(slices, axis=axis)
    coords = source_grid(stacked.shape, new)
    if order_z == 0:
        return ndimage.map_coordinates(stacked, coords, order=0, mode="nearest")
    out = np.zeros(new, dtype=seg.dtype)
    for value in np.unique(stacked):  # nnU-Net rounds, so a label needs > 0.5 along the separate axis
        mask = ndimage.map_coordinates((stacked == value).astype(np.float64), coords, order=1, mode="nearest")
        out[np.round(mask) > 0.5] = value
    return out


@pytest.mark.parametrize("order", [3, 1])
@pytest.mark.parametrize(("old", "new"), SHAPE_PAIRS)
def test_image_equals_skimage_resize(old: tuple[int, ...], new: tuple[int, ...], order: int,
                                     record_property: pytest.RecordProperty) -> None:
    transform = pytest.importorskip("skimage.transform")
    volume = smooth_volume(old, seed=sum(old))
    expected = transform.resize(volume.astype(np.float64), new, order=order, mode="edge",
                                anti_aliasing=False, preserve_range=True)
    result = resample_image(volume[None], new, order=order)
    assert result.shape == (1, *new) and result.dtype == np.float32
    error = float(np.abs(result[0] - expected).max() / np.ptp(volume))
    record_property("max_error_relative_to_range", error)
    assert error < 1e-5


def test_multichannel_and_probabilities_are_resampled_channel_by_channel() -> None:
    volume = np.stack([smooth_volume((8, 9, 10), seed=1), -smooth_volume((8, 9, 10), seed=2)])
    both = resample_image(volume, (5, 13, 10))
    for channel in range(2):
        assert np.array_equal(both[channel], resample_image(volume[channel:channel + 1], (5, 13, 10))[0])
    probs = resample_probabilities(volume, (5, 13, 10))
    assert np.array_equal(probs, resample_image(volume, (5, 13, 10), order=1))


def test_identity_and_constant() -> None:
    volume = smooth_volume((7, 8, 9), seed=3)
    assert np.array_equal(resample_image(volume[None], (7, 8, 9))[0], volume)
    assert np.array_equal(resample_image(volume[None], (7, 8, 9), separate_axis=0)[0], volume)
    constant = np.full((1, 6, 7, 5), 3.25, dtype=np.float32)
    for order in (0, 1, 3, 5):
        assert np.allclose(resample_image(constant, (11, 4, 9), order=order), 3.25, rtol=0, atol=1e-6)
    labels = blob_labels((6, 7, 8), seed=4)
    assert np.array_equal(resample_label(labels, (6, 7, 8)), labels)


@pytest.mark.parametrize("order", [1, 3])
def test_linear_ramps_are_reproduced_in_the_interior(order: int) -> None:
    old, new = (40, 30, 24), (64, 21, 24)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in old], indexing="ij")
    ramp = (2.0 * z - 3.0 * y + 0.5 * x).astype(np.float32)
    result = resample_image(ramp[None], new, order=order)[0]
    cz, cy, cx = source_grid(old, new)
    expected = 2.0 * cz - 3.0 * cy + 0.5 * cx
    margin = 1 if order == 1 else 10  # the spline's edge padding is felt ~10 voxels in (0.27^k decay)
    inside = np.ones(new, dtype=bool)
    for coord, n in zip((cz, cy, cx), old):
        inside &= (coord >= margin) & (coord <= n - 1 - margin)
    assert inside.sum() > 500
    assert np.abs(result[inside] - expected[inside]).max() < 1e-3


def test_separate_axis_is_nearest_neighbour_along_that_axis() -> None:
    volume = smooth_volume((3, 10, 12), seed=5)
    # z 3 -> 5: centres map to -0.2, 0.4, 1.0, 1.6, 2.2 -> slices 0, 0, 1, 2, 2
    up = resample_image(volume[None], (5, 10, 12), separate_axis=0)[0]
    assert np.array_equal(up, volume[[0, 0, 1, 2, 2]])
    # with an in-plane change every output slice is that in-plane resize of its nearest input slice
    planar = resample_image(volume[None], (3, 7, 17), separate_axis=0)[0]
    assert np.array_equal(resample_image(volume[None], (5, 7, 17), separate_axis=0)[0], planar[[0, 0, 1, 2, 2]])
    for k in range(3):
        alone = resample_image(volume[None, k:k + 1], (1, 7, 17))[0, 0]
        assert np.allclose(planar[k], alone, atol=1e-4)
    # order_z 1: the in-plane result, then linear along z
    linear = resample_image(planar[None], (5, 7, 17), order=1)[0]
    assert np.allclose(resample_image(volume[None], (5, 7, 17), separate_axis=0, order_z=1)[0], linear, atol=1e-4)
    # z 5 -> 2: centres map to 0.75 and 3.25 -> slices 1 and 3; labels the same way
    tall = smooth_volume((5, 6, 6), seed=6)
    assert np.array_equal(resample_image(tall[None], (2, 6, 6), separate_axis=0)[0], tall[[1, 3]])
    labels = blob_labels((5, 6, 6), seed=7)
    assert np.array_equal(resample_label(labels, (2, 6, 6), separate_axis=0), labels[[1, 3]])
    assert np.array_equal(resample_label(labels, (8, 6, 6), separate_axis=0),
                          labels[[0, 0, 1, 2, 2, 3, 4, 4]])


@pytest.mark.parametrize(("old", "new"), SHAPE_PAIRS + [((12, 15, 9), (24, 30, 18)), ((12, 15, 9), (6, 5, 3))])
def test_labels_equal_the_per_label_reference(old: tuple[int, ...], new: tuple[int, ...]) -> None:
    labels = blob_labels(old, seed=sum(new))
    assert set(np.unique(labels)) == {-1, 0, 1, 2, 3}
    assert np.array_equal(resample_label(labels, new), reference_labels(labels, new))
    assert np.array_equal(resample_label(labels, new, order=0),
                          ndimage.map_coordinates(labels, source_grid(old, new), order=0, mode="nearest"))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_labels_with_separate_axis_equal_nnunet(axis: int) -> None:
    labels = blob_labels((9, 11, 13), seed=axis)
    for new in ((17, 6, 20), (4, 16, 13)):
        expected = reference_separate(labels, new, axis)
        assert np.array_equal(resample_label(labels, new, separate_axis=axis), expected)
    for new in ((18, 6, 26), (3, 16, 13)):
        expected = reference_separate(labels, new, axis, order_z=1)
        assert np.array_equal(resample_label(labels, new, separate_axis=axis, order_z=1), expected)
    channels = np.stack([labels, labels[::-1]])
    both = resample_label(channels, (17, 6, 20), separate_axis=axis)
    assert np.array_equal(both[1], resample_label(labels[::-1], (17, 6, 20), separate_axis=axis))


def test_one_voxel_thick_structures_survive_upsampling() -> None:
    labels = np.zeros((11, 8, 8), dtype=np.uint8)
    labels[5] = 1  # a sheet one slice thick
    labels[:, 3, 4] = 2  # a line one voxel thick, crossing it
    result = resample_label(labels, (22, 16, 16))
    assert np.array_equal(result, reference_labels(labels, (22, 16, 16)))
    assert set(np.flatnonzero((result == 1).any(axis=(1, 2)))) == {10, 11}
    assert (result[:, 6:8, 8:10] == 2).all()


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_label_properties(data: st.DataObject) -> None:
    old = tuple(data.draw(st.lists(st.integers(1, 7), min_size=3, max_size=3)))
    new = tuple(data.draw(st.lists(st.integers(1, 12), min_size=3, max_size=3)))
    values = data.draw(st.lists(st.integers(-1, 12), min_size=1, max_size=10, unique=True))
    seed = data.draw(st.integers(0, 2**16))
    labels = np.asarray(values, dtype=np.int8)[np.random.default_rng(seed).integers(0, len(values), old)]
    axis = data.draw(st.sampled_from([None, 0, 1, 2]))
    order_z = data.draw(st.sampled_from([0, 1]))
    result = resample_label(labels, new, separate_axis=axis, order_z=order_z)
    assert result.shape == new and result.dtype == np.int8
    assert set(np.unique(result)) <= set(values) | {0}  # 0 is the fill where no label reaches 0.5
    expected = reference_labels(labels, new) if axis is None else reference_separate(labels, new, axis, order_z)
    assert np.array_equal(result, expected)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=3, max_size=3), st.lists(st.integers(1, 14), min_size=3, max_size=3),
       st.sampled_from([None, 0, 2]), st.sampled_from([0, 1, 3]))
def test_image_shape_contract(old: list[int], new: list[int], axis: int | None, order: int) -> None:
    volume = smooth_volume(tuple(old), seed=7)
    result = resample_image(np.stack([volume, volume * 2]), new, order=order, separate_axis=axis)
    assert result.shape == (2, *new) and result.dtype == np.float32
    assert volume.min() <= result[0].min() and result[0].max() <= volume.max()  # clipped as skimage does


def test_separate_axis_decisions() -> None:
    assert separate_axis((1.0, 1.0, 1.0), (0.7, 0.7, 0.7)) is None
    assert separate_axis((3.5, 1.0, 1.0), (1.0, 1.0, 1.0)) == 0
    assert separate_axis((3.0, 1.0, 1.0), (1.0, 1.0, 1.0)) is None  # the ratio must exceed the threshold
    assert separate_axis((1.0, 1.0, 1.0), (1.0, 1.0, 4.0)) == 2  # only the target is anisotropic
    assert separate_axis((0.24, 1.25, 1.25), (1.0, 1.0, 5.0)) is None  # tied coarsest axes: no separate z
    assert separate_axis((5.0, 5.0, 1.0), (1.0, 1.0, 1.0)) is None
    assert separate_axis((1.0, 1.0, 5.0), (1.0, 1.0, 1.0), threshold=6.0) is None


def test_compute_new_shape() -> None:
    assert compute_new_shape((35, 51, 35), (1.0, 1.0, 1.0), (0.7, 0.7, 0.7)) == (50, 73, 50)
    assert compute_new_shape((300, 512, 512), (2.5, 0.8, 0.8), (1.0, 0.8, 0.8)) == (750, 512, 512)
    assert compute_new_shape((2, 3, 4), (1.0, 1.0, 1.0), (50.0, 1.0, 1.0)) == (1, 3, 4)


def test_invalid_arguments_raise_settings_errors() -> None:
    volume = np.zeros((1, 4, 4, 4), dtype=np.float32)
    with pytest.raises(SettingsError):
        resample_image(volume, (4, 4))
    with pytest.raises(SettingsError):
        resample_image(volume, (4, 4, 4), order=7)
    with pytest.raises(SettingsError):
        resample_image(volume, (4, 4, 4), separate_axis=3)
    with pytest.raises(SettingsError):
        resample_label(volume[0].astype(np.int8), (4, 4, 4), order=3)
    with pytest.raises(SettingsError):
        compute_new_shape((4, 4, 4), (1.0, 1.0, 0.0), (1.0, 1.0, 1.0))


@pytest.mark.realdata
def test_real_case_labels_match_reference(real_dataset) -> None:
    from autoseg.io import read_label

    label, _ = read_label(sorted((real_dataset / "labelsTr").glob("*.nii.gz"))[0])
    new = compute_new_shape(label.shape, (1.0, 1.0, 1.0), (0.7, 0.7, 0.7))
    assert np.array_equal(resample_label(label, new), reference_labels(label, new))
