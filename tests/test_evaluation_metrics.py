"""Metrics on hand-computed masks: overlap counts, empty-mask conventions, HD95 and NSD in mm."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.distance import cdist

from autoseg.evaluation.metrics import (
    confusion_counts,
    dice_score,
    hausdorff95,
    image_diagonal_mm,
    iou_score,
    normalized_surface_dice,
    surface,
    surface_distances,
    surface_scores,
    volume_mm3,
)

masks = arrays(dtype=bool, shape=(3, 4, 5))


def _cube(start: tuple[int, int, int], size: int = 4, shape: tuple[int, ...] = (10, 10, 10)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def test_counts_dice_iou_and_volume_by_hand() -> None:
    pred = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    ref = np.array([0, 1, 1, 1, 1, 0], dtype=bool)
    counts = confusion_counts(pred, ref)
    assert counts == (2, 1, 2, 1)
    assert dice_score(counts) == pytest.approx(4 / 7)
    assert iou_score(counts) == pytest.approx(2 / 5)
    assert volume_mm3(counts.tp + counts.fp, (2.0, 0.5, 1.5)) == pytest.approx(4.5)


def test_counts_skip_invalid_voxels() -> None:
    pred = np.array([1, 1, 0, 0], dtype=bool)
    ref = np.array([1, 0, 1, 0], dtype=bool)
    valid = np.array([1, 0, 0, 1], dtype=bool)
    assert confusion_counts(pred, ref, valid) == (1, 0, 0, 1)


def test_both_empty_is_not_defined() -> None:
    empty = np.zeros((4, 5, 6), dtype=bool)
    counts = confusion_counts(empty, empty)
    assert math.isnan(dice_score(counts)) and math.isnan(iou_score(counts))
    scores = surface_scores(empty, empty, (1.0, 1.0, 1.0))
    assert math.isnan(scores.hd95) and math.isnan(scores.nsd)


@pytest.mark.parametrize("pred_empty", [True, False])
def test_one_empty_gives_worst_finite_values(pred_empty: bool) -> None:
    full = _cube((1, 1, 1), size=2, shape=(4, 5, 6))
    empty = np.zeros_like(full)
    pred, ref = (empty, full) if pred_empty else (full, empty)
    spacing = (2.0, 1.0, 0.5)
    counts = confusion_counts(pred, ref)
    assert dice_score(counts) == 0.0 and iou_score(counts) == 0.0
    assert normalized_surface_dice(pred, ref, spacing) == 0.0
    assert hausdorff95(pred, ref, spacing) == pytest.approx(math.sqrt(8**2 + 5**2 + 3**2))


def test_perfect_match() -> None:
    mask = _cube((2, 3, 1), size=5)
    counts = confusion_counts(mask, mask)
    assert dice_score(counts) == 1.0 and iou_score(counts) == 1.0
    assert surface_scores(mask, mask, (3.0, 0.7, 0.7)) == (0.0, 1.0)


def test_one_voxel_shift_along_the_coarse_axis_costs_its_spacing() -> None:
    # Shifting a 4^3 cube by one slice (3 mm): per direction, 16 face voxels are 3 mm away, the 4 inner
    # voxels of the other face 1 mm (nearest in-plane surface), the other 36 surface voxels coincide.
    ref, pred = _cube((2, 2, 2)), _cube((3, 2, 2))
    spacing = (3.0, 1.0, 1.0)
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    for distances in (to_ref, to_pred):
        assert sorted(distances) == [0.0] * 36 + [1.0] * 4 + [3.0] * 16
    assert hausdorff95(pred, ref, spacing) == pytest.approx(3.0)
    assert normalized_surface_dice(pred, ref, spacing, tolerance_mm=1.0) == pytest.approx(80 / 112)
    assert normalized_surface_dice(pred, ref, spacing, tolerance_mm=3.0) == pytest.approx(1.0)
    assert hausdorff95(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(1.0)


def test_nsd_below_and_above_tolerance_for_a_fine_axis_shift() -> None:
    # Shifted one voxel along x (0.8 mm): every non-coinciding surface voxel is 0.8 mm away.
    ref, pred = _cube((2, 2, 2)), _cube((2, 2, 3))
    spacing = (3.0, 1.0, 0.8)
    assert normalized_surface_dice(pred, ref, spacing, tolerance_mm=0.5) == pytest.approx(72 / 112)
    assert normalized_surface_dice(pred, ref, spacing, tolerance_mm=0.8) == pytest.approx(1.0)
    assert hausdorff95(pred, ref, spacing) == pytest.approx(0.8)


def test_union_and_max_conventions_differ_on_an_outlier() -> None:
    # A line (singleton axes dropped): ref covers 0..9, pred the same plus an island at 30.
    ref = np.zeros((1, 1, 40), dtype=bool)
    ref[..., :10] = True
    pred = ref.copy()
    pred[..., 30] = True
    spacing = (5.0, 5.0, 1.0)
    # pred -> ref: [0, 0, 21]; ref -> pred: [0, 0]
    assert hausdorff95(pred, ref, spacing, combine="union") == pytest.approx(0.8 * 21)
    assert hausdorff95(pred, ref, spacing) == pytest.approx(0.9 * 21)  # default: MONAI's convention


def test_surface_uses_face_connectivity() -> None:
    mask = np.zeros((7, 7), dtype=bool)
    mask[1:6, 1:6] = True
    mask[[1, 1, 5, 5], [1, 5, 1, 5]] = False  # cut the corners
    edge = surface(mask)
    assert not edge[2, 2]  # its diagonal neighbour (1, 1) is outside, its face neighbours are inside
    assert np.count_nonzero(edge) == 12
    assert np.count_nonzero(surface(_cube((0, 0, 0), size=3, shape=(3, 3, 3)))) == 26  # border is outside


def test_2d_images_stored_with_a_singleton_axis_get_2d_contours() -> None:
    ref = np.zeros((1, 8, 8), dtype=bool)
    ref[0, 2:6, 2:6] = True
    pred = np.roll(ref, 1, axis=2)
    spacing = (999.0, 1.0, 0.5)
    assert hausdorff95(pred, ref, spacing) == pytest.approx(0.5)
    assert image_diagonal_mm(ref.shape, spacing) == pytest.approx(math.hypot(8.0, 4.0))


def _random_blobs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.random(shape), sigma=1.5)
    return noise > np.quantile(noise, rng.uniform(0.7, 0.97))


@pytest.mark.parametrize("seed", range(6))
def test_bounding_box_crop_matches_the_full_volume(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (12, 24, 20)
    pred, ref = _random_blobs(rng, shape), _random_blobs(rng, shape)
    pred[:, :6] = ref[:, :6] = False  # leave room to crop on one side; the blobs may still touch others
    spacing = (2.5, 0.8, 1.1)
    for cropped, full in zip(surface_distances(pred, ref, spacing), surface_distances(pred, ref, spacing, crop=False)):
        np.testing.assert_allclose(cropped, full, rtol=0, atol=1e-12)
    tolerance = float(rng.uniform(0.5, 3.0))
    assert surface_scores(pred, ref, spacing, tolerance_mm=tolerance) == pytest.approx(
        surface_scores(pred, ref, spacing, tolerance_mm=tolerance, crop=False)
    )


@pytest.mark.parametrize("seed", range(3))
def test_surface_distances_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    shape = (6, 9, 8)
    pred, ref = _random_blobs(rng, shape), _random_blobs(rng, shape)
    spacing = np.array([3.0, 0.9, 1.2])
    pred_points = np.argwhere(surface(pred)) * spacing
    ref_points = np.argwhere(surface(ref)) * spacing
    pairwise = cdist(pred_points, ref_points)
    to_ref, to_pred = surface_distances(pred, ref, tuple(spacing))
    np.testing.assert_allclose(to_ref, pairwise.min(axis=1), atol=1e-9)
    np.testing.assert_allclose(to_pred, pairwise.min(axis=0), atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(masks, masks)
def test_dice_is_symmetric_and_matches_its_definition(a: np.ndarray, b: np.ndarray) -> None:
    forward, backward = dice_score(confusion_counts(a, b)), dice_score(confusion_counts(b, a))
    total = a.sum() + b.sum()
    if total == 0:
        assert math.isnan(forward) and math.isnan(backward)
        return
    assert forward == backward == pytest.approx(2 * np.logical_and(a, b).sum() / total)


@settings(max_examples=40, deadline=None)
@given(masks, st.sampled_from([(1.0, 1.0, 1.0), (3.0, 0.5, 0.7)]))
def test_identical_masks_have_zero_hd95_and_full_nsd(mask: np.ndarray, spacing: tuple[float, ...]) -> None:
    scores = surface_scores(mask, mask, spacing)
    if not mask.any():
        assert math.isnan(scores.hd95)
        return
    assert scores == (0.0, 1.0)


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        confusion_counts(np.zeros((2, 2), bool), np.zeros((2, 3), bool))
    with pytest.raises(ValueError, match="spacing"):
        hausdorff95(np.ones((2, 2), bool), np.ones((2, 2), bool), (1.0,))
    with pytest.raises(ValueError, match="combine"):
        hausdorff95(np.ones((2, 2), bool), np.ones((2, 2), bool), (1.0, 1.0), combine="mean")  # type: ignore[arg-type]
