"""Sliding-window prediction of a whole preprocessed volume with one or several networks.

Each batch of tiles goes through every network (the folds of an ensemble) and every mirrored copy
(test-time augmentation); their mean logits, weighted by a Gaussian, are added into one
accumulator, so the volume is read once however many folds there are. The weight sum is separable
and never stored at full size. The accumulator lives on the GPU when it fits there and falls back
to CPU memory for huge volumes instead of failing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from autoseg.inference.tiling import (
    gaussian_axes,
    gaussian_importance,
    mirror_combinations,
    pad_to_patch,
    tile_boxes,
    weight_sums,
)
from autoseg.log import get_logger
from autoseg.runtime.device import autocast

log = get_logger("inference")


@dataclass(frozen=True)
class WindowSettings:
    """How the window slides. `patch` and `mirror_axes` are in the network's axes (2 or 3 of them);
    a 2d network on a 3d volume runs slice by slice along the first axis."""

    patch: tuple[int, ...]
    step: float = 0.5
    mirror_axes: tuple[int, ...] = ()
    tiles_per_batch: int = 1
    gaussian: bool = True


def sliding_window_logits(
    networks: Sequence[nn.Module], data: np.ndarray, settings: WindowSettings, *, num_classes: int,
    device: torch.device, amp: torch.dtype | None = None,
) -> torch.Tensor:
    """Mean logits (num_classes, *data.shape[1:]) float32 on the CPU for a volume (c, *spatial)."""
    window = settings.patch if len(settings.patch) == data.ndim - 1 else (1,) * (data.ndim - 1 - len(
        settings.patch)) + tuple(settings.patch)
    padded, inner = pad_to_patch(np.asarray(data, dtype=np.float32), window)
    volume = torch.from_numpy(np.ascontiguousarray(padded))
    volume = _to_device_if_it_fits(volume, device)
    axes = gaussian_axes(window) if settings.gaussian else [np.ones(int(p)) for p in window]
    weight = torch.from_numpy(gaussian_importance(window) if settings.gaussian else np.ones(window, np.float32))
    logits = _accumulator(num_classes, padded.shape[1:], device)
    weight = weight.to(logits.device)
    flips = mirror_combinations(settings.mirror_axes)
    boxes = tile_boxes(padded.shape[1:], window, settings.step)
    squeeze = len(window) - len(settings.patch)
    with torch.inference_mode():
        for first in range(0, len(boxes), settings.tiles_per_batch):
            batch_boxes = boxes[first:first + settings.tiles_per_batch]
            tiles = torch.stack([volume[(slice(None), *box)] for box in batch_boxes]).to(device, non_blocking=True)
            mean = _mean_prediction(networks, tiles, flips, squeeze=squeeze, device=device, amp=amp)
            mean = mean.to(logits.device) * weight
            for tile, box in zip(mean, batch_boxes):
                logits[(slice(None), *box)] += tile
    for dim, total in enumerate(weight_sums(padded.shape[1:], window, settings.step, axes)):
        view = [1] * logits.ndim
        view[dim + 1] = -1
        logits /= torch.from_numpy(total.astype(np.float32)).to(logits.device).reshape(view)
    return logits[(slice(None), *inner)].cpu()


def _mean_prediction(networks: Sequence[nn.Module], tiles: torch.Tensor, flips: list[tuple[int, ...]], *,
                     squeeze: int, device: torch.device, amp: torch.dtype | None) -> torch.Tensor:
    """Mean float32 logits of every network on every mirrored copy of a batch (b, c, *window)."""
    spatial_from = 2 + squeeze
    inputs = tiles.reshape(*tiles.shape[:2], *tiles.shape[spatial_from:]) if squeeze else tiles
    total = None
    for network in networks:
        for flip in flips:
            dims = [2 + axis for axis in flip]
            x = torch.flip(inputs, dims) if dims else inputs
            with autocast(device, amp):
                out = network(x)
            out = out.float()
            out = torch.flip(out, dims) if dims else out
            total = out if total is None else total.add_(out)
    assert total is not None
    total /= len(networks) * len(flips)
    if squeeze:
        total = total.reshape(*total.shape[:2], *tiles.shape[2:spatial_from], *total.shape[2:])
    return total


def _to_device_if_it_fits(volume: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return volume
    try:
        return volume.to(device)
    except torch.OutOfMemoryError:
        log.info("the volume does not fit on %s; tiles are copied one batch at a time", device)
        return volume


def _accumulator(num_classes: int, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """The weighted logit sum, on the device when it fits there, else in CPU memory. (The weight sum
    needs no map of its own: it is separable, see `weight_sums`.)"""
    if device.type != "cpu":
        try:
            return torch.zeros((num_classes, *shape), dtype=torch.float32, device=device)
        except torch.OutOfMemoryError:
            log.warning("the prediction of this volume does not fit on %s; accumulating in CPU memory", device)
    return torch.zeros((num_classes, *shape), dtype=torch.float32)
