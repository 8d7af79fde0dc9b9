"""Label maps exported while the sliding window runs: memory that does not grow with the class count.

The sliding window hands out finished slabs of logits along the first axis of the network's grid
(`sliding_window_slabs`). `StreamedLabels` resamples each class of the rows that are complete back to
the cropped input grid (`RowResampler`: only the input rows a slab of output rows reads) and decides
the label with a running argmax (or sigmoid > 0.5 per region), then drops the input rows no later
output row needs. What is held at once: the open rows of the window, a few slabs of logits, and the
label map of the input's size (uint8), so a 100-class whole-body CT never holds a 100-class volume.
The labels equal those of `restore_prediction` on the whole logit volume (tests) where `streamed_export_is_exact`
(linear probability resampling, nnU-Net's and autoseg's default; see autoseg.preprocessing.resample_rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoseg.inference.export import LabelSemantics, decide_labels, label_dtype, logits_to_probabilities
from autoseg.inference.probability_file import ProbabilityFile
from autoseg.planning.contract import Configuration, Plans
from autoseg.preprocessing.contract import CaseProperties
from autoseg.preprocessing.inverse import place_in_original, resampling_axis
from autoseg.preprocessing.resample_rows import RowResampler

#: Output rows decided per step: bounds the per-class temporaries (rows x the input's plane, float32).
OUTPUT_ROWS_PER_STEP = 8
#: With probabilities, every class of a step's rows is held at once: at most this many bytes (one row at least).
ALL_CLASSES_BYTES = 128 * 2**20


def streamed_export_is_exact(grid_shape: Sequence[int], properties: CaseProperties, config: Configuration) -> bool:
    """Whether the row-by-row export gives the whole-volume export's labels (RowResampler.is_exact)."""
    return RowResampler.is_exact(grid_shape, properties.shape_after_crop, order=config.resampling.order_probabilities,
                                 separate_axis=resampling_axis(properties, config))


class StreamedLabels:
    """Collects logit slabs (classes, rows, y, x) of the network grid in row order; `finish()` returns the
    label map (z, y, x) on the input's grid, as `restore_prediction(..., with_probabilities=False)`."""

    def __init__(self, grid_shape: Sequence[int], properties: CaseProperties, *, plans: Plans,
                 config: Configuration, semantics: LabelSemantics, num_classes: int,
                 probabilities: ProbabilityFile | None = None) -> None:
        self.properties, self.plans, self.semantics = properties, plans, semantics
        self.probabilities = probabilities  # also written, row block by row block, when given
        plane = int(np.prod(properties.shape_after_crop[1:]))
        self.rows_per_step = OUTPUT_ROWS_PER_STEP if probabilities is None else \
            max(1, min(OUTPUT_ROWS_PER_STEP, ALL_CLASSES_BYTES // (4 * num_classes * plane)))
        resampling = config.resampling
        self.resampler = RowResampler(grid_shape, properties.shape_after_crop, order=resampling.order_probabilities,
                                      order_z=resampling.order_z, separate_axis=resampling_axis(properties, config))
        self.labels = np.zeros(properties.shape_after_crop, dtype=label_dtype(num_classes, semantics))
        self.held: list[tuple[int, np.ndarray]] = []  # (first row, logits (c, rows, y, x)) not yet released
        self.received = 0  # input rows 0..received-1 have arrived
        self.done = 0  # output rows 0..done-1 are decided

    def add(self, start: int, logits: np.ndarray) -> None:
        """The next slab: rows start..start + logits.shape[1] - 1 of the network grid."""
        if start != self.received:
            raise ValueError(f"slabs must come in row order: expected row {self.received}, got {start}")
        self.held.append((start, logits))
        self.received = start + logits.shape[1]
        self._decide_ready_rows()

    def finish(self) -> np.ndarray:
        """The label map (z, y, x) in the input file's array order; every slab must have been added.
        The probability file, if any, is completed too."""
        if self.done < self.labels.shape[0]:
            raise ValueError(f"only {self.received} of {self.resampler.shape[0]} rows of logits arrived")
        if self.probabilities is not None:
            self.probabilities.finish()
        return place_in_original(self.labels, self.properties, plans=self.plans)

    def _decide_ready_rows(self) -> None:
        ready = self.resampler.rows_ready(self.received)
        while self.done < ready:
            stop = min(self.done + self.rows_per_step, ready)
            low, high = self.resampler.rows_needed(self.done, stop)
            block = self._rows(low, high)
            self.labels[self.done:stop] = self._decide(block, low, self.done, stop)
            self.done = stop
            if self.done < self.labels.shape[0]:
                self._release_before(self.resampler.rows_needed(self.done, self.done + 1)[0])

    def _rows(self, low: int, high: int) -> np.ndarray:
        """Held input rows low..high-1 as one array (classes, rows, y, x)."""
        pieces = [logits[:, max(low - start, 0):high - start] for start, logits in self.held
                  if start < high and start + logits.shape[1] > low]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1)

    def _release_before(self, row: int) -> None:
        kept = []
        for start, logits in self.held:
            if start + logits.shape[1] > row:
                # a copy of the rows kept, so the rest of a partly released slab is freed
                kept.append((start, logits) if start >= row else (row, logits[:, row - start:].copy()))
        self.held = kept

    def _decide(self, block: np.ndarray, low: int, start: int, stop: int) -> np.ndarray:
        """Labels of output rows start..stop-1, class by class (see decide_labels); with a probability file,
        every class of the rows at once, so that their probabilities can be written first."""
        channels = (self.resampler.resample(channel, low, start, stop) for channel in block)
        if self.probabilities is not None:
            logits = np.stack(list(channels))
            self.probabilities.write_rows(start, logits_to_probabilities(logits, self.semantics))
            channels = iter(logits)
        return decide_labels(channels, self.semantics, self.labels.dtype)
