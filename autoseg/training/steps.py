"""One optimisation step and one validation step, device-agnostic (the context says where)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from autoseg.runtime.device import autocast


def to_device(batch: dict[str, Any], device: torch.device, *, channels_last: bool = False) -> tuple[Any, list[Any]]:
    """numpy batch -> (data tensor, list of int64 target tensors), non-blocking on CUDA."""
    data = torch.from_numpy(np.ascontiguousarray(batch["data"])).to(device, non_blocking=True)
    if channels_last and data.ndim in (4, 5):
        data = data.contiguous(memory_format=torch.channels_last if data.ndim == 4 else torch.channels_last_3d)
    targets = [torch.from_numpy(np.ascontiguousarray(t)).to(device, non_blocking=True).long()
               for t in batch["target"]]
    return data, targets


def as_list(outputs: Any) -> list[torch.Tensor]:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def train_step(
    network: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, batch: tuple[Any, list[Any]], *,
    scaler: Any, amp_dtype: Any, grad_clip: float,
) -> float:
    """Forward, loss, backward (scaled for fp16), clip, step; returns the loss value."""
    data, targets = batch
    optimizer.zero_grad(set_to_none=True)
    with autocast(data.device, amp_dtype):
        outputs = as_list(network(data))
        loss = loss_fn(outputs, targets[: len(outputs)])
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(network.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


@torch.no_grad()
def validation_step(
    network: nn.Module, loss_fn: nn.Module, batch: tuple[Any, list[Any]], *, amp_dtype: Any,
    regions: Sequence[Sequence[int]] | None, num_classes: int,
) -> tuple[float, np.ndarray]:
    """Loss and per-class [TP, FP, FN] counts (classes, 3) of the highest-resolution output."""
    data, targets = batch
    with autocast(data.device, amp_dtype):
        outputs = as_list(network(data))
        loss = loss_fn(outputs, targets[: len(outputs)])
    logits, labels = outputs[0].float(), targets[0][:, 0]
    if regions:
        predicted = logits.sigmoid() > 0.5
        truth = torch.stack([torch.isin(labels, torch.tensor(r, device=labels.device)) for r in regions], 1)
    else:
        classes = torch.arange(1, num_classes, device=labels.device).view(1, -1, *([1] * (labels.ndim - 1)))
        predicted = logits.argmax(1, keepdim=True) == classes
        truth = labels[:, None] == classes
    axes = (0, *range(2, predicted.ndim))
    counts = torch.stack([(predicted & truth).sum(axes), (predicted & ~truth).sum(axes),
                          (~predicted & truth).sum(axes)], 1)
    return float(loss), counts.cpu().numpy().astype(np.int64)


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """Dice per class from summed [TP, FP, FN]; NaN for classes absent from both."""
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)
