"""Segmentation losses: soft Dice + cross-entropy (labels) or + BCE (regions), deep supervision.

Targets are integer label maps (b, 1, *spatial). Voxels equal to the ignore label take no part
in either term. Dice is computed on foreground classes only for softmax training (background
is implied) and on every region for sigmoid training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

SMOOTH = 1e-5


def soft_dice(
    probs: torch.Tensor, onehot: torch.Tensor, mask: torch.Tensor | None, *, batch_dice: bool
) -> torch.Tensor:
    """Mean soft Dice over channels. probs/onehot: (b, c, *spatial); mask: (b, 1, *spatial) or None.

    With `batch_dice`, sums are pooled over the batch before the ratio (one Dice per class).
    """
    if mask is not None:
        probs = probs * mask
        onehot = onehot * mask
    axes = tuple(range(2, probs.ndim))
    if batch_dice:
        axes = (0, *axes)
    intersection = (probs * onehot).sum(axes)
    total = probs.sum(axes) + onehot.sum(axes)
    dice = (2 * intersection + SMOOTH) / (total + SMOOTH).clamp_min(1e-8)
    return dice.mean()


class DiceCELoss(nn.Module):
    """Cross-entropy + (1 - soft Dice) over foreground classes, for mutually exclusive labels."""

    def __init__(self, *, batch_dice: bool = False, ignore_label: int | None = None) -> None:
        super().__init__()
        self.batch_dice = batch_dice
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = target[:, 0].long()
        mask = None
        if self.ignore_label is not None:
            keep = labels != self.ignore_label
            mask = keep[:, None].to(logits.dtype)
            labels = torch.where(keep, labels, torch.zeros_like(labels))
        ce = F.cross_entropy(logits, labels, reduction="none")
        ce = ce.mean() if mask is None else (ce * mask[:, 0]).sum() / mask.sum().clamp_min(1)
        probs = logits.float().softmax(1)[:, 1:]
        onehot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
        dice = soft_dice(probs, onehot, mask, batch_dice=self.batch_dice)
        return ce + 1.0 - dice


class RegionDiceBCELoss(nn.Module):
    """BCE + (1 - soft Dice) for overlapping regions (sigmoid outputs, one channel per region)."""

    def __init__(self, regions: Sequence[Sequence[int]], *, batch_dice: bool = False,
                 ignore_label: int | None = None) -> None:
        super().__init__()
        self.regions = [tuple(r) for r in regions]
        self.batch_dice = batch_dice
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = target[:, :1].long()
        onehot = torch.cat([torch.isin(labels, torch.tensor(r, device=labels.device)) for r in self.regions], 1)
        onehot = onehot.to(torch.float32)
        mask = None if self.ignore_label is None else (labels != self.ignore_label).to(torch.float32)
        bce = F.binary_cross_entropy_with_logits(logits.float(), onehot, reduction="none")
        bce = bce.mean() if mask is None else (bce * mask).sum() / (mask.sum() * len(self.regions)).clamp_min(1)
        dice = soft_dice(logits.float().sigmoid(), onehot, mask, batch_dice=self.batch_dice)
        return bce + 1.0 - dice


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """1/2^i per output (highest resolution first), the lowest resolution ignored, normalised."""
    weights = [0.5**i for i in range(n_outputs)]
    if n_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of a loss over several outputs and their matching targets.

    A family may return k groups of outputs (k * n maps: the final network's n maps first, then each
    auxiliary network's or side path's n maps, every group highest resolution first, e.g. W-Net's first
    U-Net): every group is weighted like the single one and the groups' losses are summed, so the final
    group's loss, and its gradient, is the one a single network would get."""

    def __init__(self, loss: nn.Module, n_outputs: int) -> None:
        super().__init__()
        self.loss = loss
        self.weights = deep_supervision_weights(n_outputs)

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        n = len(self.weights)
        if not outputs or len(outputs) % n or len(targets) < n:
            raise ValueError(f"expected a multiple of {n} outputs and {n} targets, got {len(outputs)}, "
                             f"{len(targets)}")
        # zero-weight outputs stay in the graph (their gradient is 0), which keeps DDP's bookkeeping simple
        terms = [self.weights[i % n] * self.loss(o, targets[i % n]) for i, o in enumerate(outputs)]
        return torch.stack(terms).sum()
