"""Losses against hand-computed values; deep-supervision weights as nnU-Net defines them."""

from __future__ import annotations

import math

import pytest
import torch

from autoseg.training.loss import (
    DeepSupervisionLoss,
    DiceCELoss,
    RegionDiceBCELoss,
    deep_supervision_weights,
    soft_dice,
)


def test_deep_supervision_weights_match_nnunet() -> None:
    assert deep_supervision_weights(5) == pytest.approx([0.533, 0.267, 0.133, 0.067, 0.0], abs=1e-3)
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(1) == [1.0]


def test_soft_dice_of_perfect_and_disjoint_predictions() -> None:
    onehot = torch.zeros(1, 1, 4)
    onehot[0, 0, :2] = 1
    assert soft_dice(onehot, onehot, None, batch_dice=False).item() == pytest.approx(1.0)
    assert soft_dice(1 - onehot, onehot, None, batch_dice=False).item() == pytest.approx(0.0, abs=1e-5)
    half = torch.full((1, 1, 4), 0.5)
    assert soft_dice(half, onehot, None, batch_dice=False).item() == pytest.approx(2 * 1 / (2 + 2), abs=1e-5)


def test_dice_ce_matches_hand_computation() -> None:
    logits = torch.zeros(1, 2, 4)  # uniform: p = 0.5 everywhere
    target = torch.tensor([[[1, 1, 0, 0]]])
    loss = DiceCELoss()(logits, target)
    expected_ce = math.log(2)
    expected_dice = (2 * 1.0 + 1e-5) / (2.0 + 2.0 + 1e-5)
    assert loss.item() == pytest.approx(expected_ce + 1 - expected_dice, abs=1e-5)


def test_ignore_label_takes_no_part() -> None:
    target = torch.tensor([[[1, 0, 3, 3]]])
    logits = torch.randn(1, 3, 4)
    loss = DiceCELoss(ignore_label=3)
    changed = logits.clone()
    changed[..., 2:] = torch.randn(1, 3, 2) * 10
    assert loss(logits, target).item() == pytest.approx(loss(changed, target).item(), abs=1e-6)


def test_confident_correct_prediction_has_near_zero_loss() -> None:
    target = torch.tensor([[[[0, 1], [2, 1]]]])
    logits = torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).float() * 50
    assert DiceCELoss(batch_dice=True)(logits, target).item() < 1e-3


def test_region_loss_treats_regions_as_overlapping_masks() -> None:
    target = torch.tensor([[[0, 1, 2, 2]]])
    regions = [(1, 2), (2,)]
    perfect = torch.tensor([[[-50.0, 50, 50, 50], [-50, -50, 50, 50]]])
    loss = RegionDiceBCELoss(regions)
    assert loss(perfect, target).item() < 1e-3
    assert loss(-perfect, target).item() > 1.0


def test_deep_supervision_weights_outputs_and_checks_lengths() -> None:
    loss = DeepSupervisionLoss(DiceCELoss(), 3)
    outputs = [torch.randn(2, 2, 8), torch.randn(2, 2, 4), torch.randn(2, 2, 2)]
    targets = [torch.randint(0, 2, (2, 1, 8)), torch.randint(0, 2, (2, 1, 4)), torch.randint(0, 2, (2, 1, 2))]
    value = loss(outputs, targets)
    inner = DiceCELoss()
    expected = 2 / 3 * inner(outputs[0], targets[0]) + 1 / 3 * inner(outputs[1], targets[1])
    assert value.item() == pytest.approx(expected.item(), abs=1e-6)
    with pytest.raises(ValueError):
        loss(outputs[:2], targets[:2])


def test_groups_of_outputs_are_each_weighted_like_one_and_summed() -> None:
    """W-Net style: the final network's maps, then an auxiliary network's, against the same targets."""
    loss, inner = DeepSupervisionLoss(DiceCELoss(), 2), DiceCELoss()
    targets = [torch.randint(0, 2, (2, 1, 8)), torch.randint(0, 2, (2, 1, 4))]
    final = [torch.randn(2, 2, 8), torch.randn(2, 2, 4)]
    auxiliary = [torch.randn(2, 2, 8), torch.randn(2, 2, 4)]
    value = loss(final + auxiliary, targets)
    assert value.item() == pytest.approx(loss(final, targets).item() + loss(auxiliary, targets).item(), abs=1e-6)
    assert loss(final, targets).item() == pytest.approx(inner(final[0], targets[0]).item(), abs=1e-6)
    with pytest.raises(ValueError, match="multiple of 2"):
        loss(final + auxiliary[:1], targets)
