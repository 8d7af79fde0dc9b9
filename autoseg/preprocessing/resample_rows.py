"""Resampling of one float channel a few rows at a time along the first axis (streamed prediction export).

`resample_probabilities` resamples a whole volume. A prediction that arrives in slabs along the first
axis can be exported while it arrives: output rows a..b-1 of the first axis read only the input rows
their interpolation taps reach (`rows_needed`), so `resample` computes them from just those rows, with
the same per-axis steps in the same order as the whole-volume resampling. Equal to it up to float32
rounding (a matmul over fewer columns may round differently in the last bit) where `is_exact`: spline
orders >= 2 in-plane clip the result to the input's range, over whole planes across axis 0 unless axis
0 is the separate axis, and rows alone cannot know that range (linear interpolation never leaves it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoseg.preprocessing.resample import _BAND_TOL, _apply_matrix, _plan_steps


class RowResampler:
    """One channel (z, y, x) from grid `shape` to `new_shape` as `resample_probabilities(order, order_z,
    separate_axis)` does, computed for any range of output rows along axis 0."""

    def __init__(self, shape: Sequence[int], new_shape: Sequence[int], *, order: int, order_z: int,
                 separate_axis: int | None) -> None:
        self.shape, self.new_shape = tuple(int(s) for s in shape), tuple(int(s) for s in new_shape)
        self.axis = separate_axis
        self.steps, self.first, self.last = _plan_steps(self.shape, self.new_shape, order, order_z, separate_axis)
        self.row_step = next((i for i, (a, _, _) in enumerate(self.steps) if a == 0), None)
        low, high = self._taps()
        # monotone envelopes: rows a..b-1 need input rows low[a]..high[b-1]-1
        self.low = np.minimum.accumulate(low[::-1])[::-1]
        self.high = np.maximum.accumulate(high)

    @staticmethod
    def is_exact(shape: Sequence[int], new_shape: Sequence[int], *, order: int, separate_axis: int | None) -> bool:
        """Rows give the whole-volume result: no range clip that spans axis 0 (see the module's docstring),
        i.e. linear in-plane interpolation, no in-plane axis resized, or axis 0 the separate axis."""
        in_plane_resized = any(int(shape[a]) != int(new_shape[a]) for a in range(len(shape)) if a != separate_axis)
        return order <= 1 or not in_plane_resized or separate_axis == 0

    def _taps(self) -> tuple[np.ndarray, np.ndarray]:
        """First and one-past-last input row each output row reads along axis 0."""
        rows = np.arange(self.new_shape[0])
        if self.row_step is None:
            return rows, rows + 1
        _, kind, operator = self.steps[self.row_step]
        if kind == "take":
            return operator.astype(np.intp), operator.astype(np.intp) + 1
        significant = np.abs(operator) > _BAND_TOL * np.abs(operator).max()
        first = significant.argmax(axis=1)
        last = operator.shape[1] - significant[:, ::-1].argmax(axis=1)
        return first, last

    def rows_needed(self, start: int, stop: int) -> tuple[int, int]:
        """Input rows [low, high) that output rows [start, stop) read."""
        return int(self.low[start]), int(self.high[stop - 1])

    def rows_ready(self, received: int) -> int:
        """How many output rows (from 0) can be computed from input rows 0..received-1."""
        return int(np.searchsorted(self.high, received, side="right"))

    def resample(self, block: np.ndarray, block_start: int, start: int, stop: int) -> np.ndarray:
        """Output rows [start, stop) (stop - start, *new_shape[1:]) float32 from input rows
        block_start..block_start + len(block) - 1 (which must hold rows_needed(start, stop))."""
        low, high = self.rows_needed(start, stop)
        if low < block_start or high > block_start + block.shape[0]:
            raise ValueError(f"rows {start}..{stop - 1} need input rows {low}..{high - 1}, the block has "
                             f"{block_start}..{block_start + block.shape[0] - 1}")
        x = np.asarray(block[low - block_start:high - block_start], dtype=np.float32)
        if not self.steps:
            return np.array(x, dtype=np.float32)
        for i, (a, kind, operator) in enumerate(self.steps):
            if i == self.first:
                others = tuple(b for b in range(x.ndim) if b != self.axis)
                bounds = x.min(axis=others, keepdims=True), x.max(axis=others, keepdims=True)
            if a == 0:
                operator = operator[start:stop] - low if kind == "take" else operator[start:stop, low:high]
            x = np.take(x, operator, axis=a, mode="clip") if kind == "take" else _apply_matrix(x, operator, a)
            if i == self.last:  # the in-plane steps never change the separate axis: bounds line up
                np.clip(x, *bounds, out=x)
        return x
