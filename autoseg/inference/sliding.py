"""Sliding-window prediction of a whole preprocessed volume with one or several networks.

Each batch of tiles goes through every network (the folds of an ensemble) and every mirrored copy
(test-time augmentation); their mean logits, weighted by a Gaussian, are added into one
accumulator, so the volume is read once however many folds there are. The weight sum is separable
and never stored at full size. The accumulator lives on the GPU when it fits there and falls back
to CPU memory for huge volumes instead of failing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from autoseg.inference.heads import BlendedOutputs
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
#: --accumulator values.
ACCUMULATORS = {"float32": torch.float32, "float16": torch.float16}
#: Logits handed out per slab at most (bytes, float32): bounds the copies of finished rows.
SLAB_BYTES = 256 * 2**20


@dataclass(frozen=True)
class WindowSettings:
    """How the window slides. `patch` and `mirror_axes` are in the network's axes (2 or 3 of them);
    a 2d network on a 3d volume runs slice by slice along the first axis."""

    patch: tuple[int, ...]
    step: float = 0.5
    mirror_axes: tuple[int, ...] = ()
    tiles_per_batch: int = 1
    gaussian: bool = True
    #: dtype of the open rows' weighted sum: float32, or float16 (half the memory; the argmax may change
    #: where the two best classes are within ~1e-3 of each other: docs/benchmarks.md measures how often)
    accumulator: str = "float32"
    #: mirrored copies of a batch stacked into one network call (1: one call per mirror, nnU-Net's way). More
    #: copies per call keep the CPU's cores busier on small patches; the sum is taken in the same order.
    mirrors_per_call: int = 1


def sliding_window_logits(
    networks: Sequence[nn.Module], data: np.ndarray, settings: WindowSettings, *, num_classes: int,
    device: torch.device, amp: torch.dtype | None = None, after_last_call: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Mean logits (num_classes, *data.shape[1:]) float32 on the CPU for a volume (c, *spatial)."""
    logits = torch.empty((num_classes, *data.shape[1:]), dtype=torch.float32)
    for slab in sliding_window_slabs(networks, data, settings, num_classes=num_classes, device=device, amp=amp,
                                     after_last_call=after_last_call):
        logits[:, slab.start:slab.stop] = slab.logits
    return logits


@dataclass(frozen=True)
class Slab:
    """Finished mean logits (num_classes, stop - start, *rest) of rows start..stop-1 of the volume's first
    spatial axis, float32 on the CPU."""

    start: int
    stop: int
    logits: torch.Tensor


def sliding_window_slabs(
    networks: Sequence[nn.Module], data: np.ndarray, settings: WindowSettings, *, num_classes: int,
    device: torch.device, amp: torch.dtype | None = None, after_last_call: Callable[[], None] | None = None,
) -> Iterator[Slab]:
    """The sliding window's mean logits of a volume (c, *spatial), slab by slab along the first axis.
    `after_last_call` runs once the networks have seen every tile, before the last rows are handed out (the
    predictor frees an engine's buffers there: the last rows come at once, see CompiledNetwork.release_memory).

    Tiles run in C order, so once every tile starting at or before a row is added, no later tile
    touches that row: it is divided by its weight sum and handed out. The logit sum is kept only for
    the rows still open, in a ring of about one patch of rows (plus the rows one batch of tiles spans),
    so the memory of the sum does not grow with the volume's first axis. Every voxel gets the same
    arithmetic as a whole-volume sum, in the same order: the slabs, put together, are the same bits.
    """
    window = settings.patch if len(settings.patch) == data.ndim - 1 else (1,) * (data.ndim - 1 - len(
        settings.patch)) + tuple(settings.patch)
    padded, inner = pad_to_patch(np.asarray(data, dtype=np.float32), window)
    volume = _to_device_if_it_fits(torch.from_numpy(np.ascontiguousarray(padded)), device)
    axes = gaussian_axes(window) if settings.gaussian else [np.ones(int(p)) for p in window]
    weight = torch.from_numpy(gaussian_importance(window) if settings.gaussian else np.ones(window, np.float32))
    sums = [torch.from_numpy(total.astype(np.float32))
            for total in weight_sums(padded.shape[1:], window, settings.step, axes)]
    boxes = tile_boxes(padded.shape[1:], window, settings.step)
    batches = [boxes[first:first + settings.tiles_per_batch] for first in range(0, len(boxes),
                                                                                settings.tiles_per_batch)]
    outputs = BlendedOutputs(networks, num_classes)
    ring = _Ring(outputs, padded.shape[1:], weight=weight, sums=sums, inner=inner, device=device,
                 rows=int(window[0]) + max(batch[-1][0].start - batch[0][0].start for batch in batches),
                 dtype=ACCUMULATORS[settings.accumulator])
    flips = mirror_combinations(settings.mirror_axes)
    squeeze = len(window) - len(settings.patch)
    with torch.inference_mode(), outputs.features_mode():
        for batch_boxes in batches:
            yield from ring.finish_rows_before(batch_boxes[0][0].start)
            tiles = torch.stack([volume[(slice(None), *box)] for box in batch_boxes]).to(device, non_blocking=True)
            mean = _mean_prediction(networks, tiles, flips, squeeze=squeeze, device=device, amp=amp,
                                    per_network=outputs.per_network, mirrors_per_call=settings.mirrors_per_call)
            for tile, box in zip(mean.to(ring.device), batch_boxes):
                ring.add(tile, box)
        if after_last_call is not None:
            after_last_call()
        yield from ring.finish_rows_before(padded.shape[1])


class _Ring:
    """The weighted sum of the open rows (first spatial axis) of the padded volume `shape`: global row g lives
    at g % rows. It holds the blended channels (logits, or features: autoseg.inference.heads), weights the
    tiles with the importance map `weight`, divides by the per-axis weight `sums` and hands out the logits of
    the rows inside `inner` (the unpadded volume)."""

    def __init__(self, outputs: BlendedOutputs, shape: Sequence[int], *, weight: torch.Tensor,
                 sums: list[torch.Tensor], inner: tuple[slice, ...], rows: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.outputs, self.sums, self.inner = outputs, sums, inner
        self.shape0 = int(shape[0])
        self.rows = min(rows, self.shape0)
        self.sum = _accumulator(outputs.channels, (self.rows, *shape[1:]), device, dtype)
        self.device = self.sum.device
        self.weight = weight.to(self.device)
        #: float32: weighted sums divided by the weight sum when finished (the exact arithmetic of the whole-
        #: volume window); reduced precision: contributions come normalised (_normalised) and are just added
        self.exact_sum = dtype == torch.float32
        plane = int(np.prod([int(n) for n in shape[1:]]))
        self.rows_per_slab = max(1, SLAB_BYTES // (4 * max(outputs.num_classes, outputs.channels) * plane))
        self.first_open = 0  # rows before it are finished and handed out

    def _pieces(self, start: int, stop: int) -> list[tuple[slice, slice]]:
        """(ring rows, local rows) of global rows start..stop-1: one piece, or two where the ring wraps."""
        offset, length = start % self.rows, stop - start
        head = min(length, self.rows - offset)
        pieces = [(slice(offset, offset + head), slice(0, head))]
        if head < length:
            pieces.append((slice(0, length - head), slice(head, length)))
        return pieces

    def add(self, tile: torch.Tensor, box: tuple[slice, ...]) -> None:
        """Add one tile's mean output (channels, *window), weighted, at `box` of the padded volume."""
        weighted = tile * (self.weight if self.exact_sum else self._normalised(box))
        for ring_rows, local in self._pieces(box[0].start, box[0].stop):
            self.sum[(slice(None), ring_rows, *box[1:])] += weighted[:, local]

    def _normalised(self, box: tuple[slice, ...]) -> torch.Tensor:
        """The tile's weights divided by the summed weight of every voxel they cover (separable): contributions
        that add up to the blended value itself, all of its order of magnitude, so a float16 sum neither
        underflows at the tile borders (Gaussian weights reach 1e-9 in the corners) nor overflows."""
        total = torch.ones((), dtype=self.weight.dtype, device=self.device)
        for dim, (axis_sum, part) in enumerate(zip(self.sums, box)):
            view = [1] * len(box)
            view[dim] = -1
            total = total * axis_sum[part].to(self.device).reshape(view)
        return self.weight / total

    def finish_rows_before(self, row: int) -> Iterator[Slab]:
        """Hand out rows first_open..row-1 (of those inside the unpadded volume) and clear them, a few
        rows per slab (SLAB_BYTES of logits at most, one row at least)."""
        for start in range(self.first_open, row, self.rows_per_slab):
            yield from self._finish(start, min(start + self.rows_per_slab, row))
        self.first_open = max(row, self.first_open)

    def _finish(self, start: int, stop: int) -> Iterator[Slab]:
        pieces = self._pieces(start, stop)
        block = torch.cat([self.sum[:, ring_rows] for ring_rows, _ in pieces], dim=1).float()
        for ring_rows, _ in pieces:
            self.sum[:, ring_rows] = 0
        for dim, total in enumerate(self.sums if self.exact_sum else []):
            view = [1] * block.ndim
            view[dim + 1] = -1
            part = total[start:stop] if dim == 0 else total
            block /= part.to(block.device).reshape(view)
        first, end, _ = self.inner[0].indices(self.shape0)
        low, high = max(start, first), min(stop, end)
        if low < high:
            rows = slice(low - start, high - start)
            logits = self.outputs.to_logits(block[(slice(None), rows, *self.inner[1:])])
            yield Slab(low - first, high - first, logits.cpu())


def _mean_prediction(networks: Sequence[nn.Module], tiles: torch.Tensor, flips: list[tuple[int, ...]], *,
                     squeeze: int, device: torch.device, amp: torch.dtype | None, per_network: bool = False,
                     mirrors_per_call: int = 1) -> torch.Tensor:
    """Mean float32 outputs of every network on every mirrored copy of a batch (b, c, *window); with
    `per_network`, each network's mean over the mirrors, concatenated along the channels. `mirrors_per_call`
    copies go through a network together (stacked along the batch axis); outputs are added in mirror order."""
    spatial_from = 2 + squeeze
    inputs = tiles.reshape(*tiles.shape[:2], *tiles.shape[spatial_from:]) if squeeze else tiles
    groups = [flips[first:first + mirrors_per_call] for first in range(0, len(flips), max(1, mirrors_per_call))]
    total, means = None, []
    for network in networks:
        if per_network and total is not None:
            means.append(total / len(flips))
            total = None
        for group in groups:
            for out in _mirrored_outputs(network, inputs, group, device=device, amp=amp):
                total = out if total is None else total.add_(out)
    assert total is not None
    if per_network:
        total = torch.cat([*means, total / len(flips)], dim=1)
    else:
        total /= len(networks) * len(flips)
    if squeeze:
        total = total.reshape(*total.shape[:2], *tiles.shape[2:spatial_from], *total.shape[2:])
    return total


def _mirrored_outputs(network: nn.Module, inputs: torch.Tensor, group: Sequence[tuple[int, ...]], *,
                      device: torch.device, amp: torch.dtype | None) -> Iterator[torch.Tensor]:
    """The network's float32 output on each mirrored copy of `inputs` (b, c, *spatial) in `group`, flipped
    back, from one call on the copies stacked along the batch axis."""
    dims = [[2 + axis for axis in flip] for flip in group]
    copies = [torch.flip(inputs, d) if d else inputs for d in dims]
    with autocast(device, amp):
        out = network(copies[0] if len(copies) == 1 else torch.cat(copies))
    out = out.float()
    for index, d in enumerate(dims):
        part = out[index * len(inputs):(index + 1) * len(inputs)]
        yield torch.flip(part, d) if d else part


def _to_device_if_it_fits(volume: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return volume
    try:
        return volume.to(device)
    except torch.OutOfMemoryError:
        log.info("the volume does not fit on %s; tiles are copied one batch at a time", device)
        return volume


def _accumulator(num_classes: int, shape: Sequence[int], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weighted logit sum, on the device when it fits there, else in CPU memory. (The weight sum
    needs no map of its own: it is separable, see `weight_sums`.)"""
    if device.type != "cpu":
        try:
            return torch.zeros((num_classes, *shape), dtype=dtype, device=device)
        except torch.OutOfMemoryError:
            log.warning("the prediction of this volume does not fit on %s; accumulating in CPU memory", device)
    return torch.zeros((num_classes, *shape), dtype=dtype)
