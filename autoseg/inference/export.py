"""From the network's logits on the preprocessed grid to a label map (and probabilities) on the input's grid.

Like nnU-Net, the logits are resampled back (not the label map), then turned into classes: argmax
for plain labels, sigmoid > 0.5 per region for region-trained models. Without probabilities the
classes are decided one channel at a time (running argmax), so exporting a 100-class CT needs one
channel at full size, not a hundred.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from autoseg.dataset.contract import Dataset
from autoseg.planning.contract import Configuration, Plans
from autoseg.preprocessing.contract import CaseProperties
from autoseg.preprocessing.inverse import place_in_original, resample_to_crop


@dataclass(frozen=True)
class LabelSemantics:
    """How channels become label values: softmax + argmax, or one sigmoid per region written in order."""

    region_values: tuple[int, ...] | None = None  # label value written for each region channel, in channel order

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> LabelSemantics:
        if not dataset.has_regions:
            return cls()
        regions = [label.values for label in dataset.foreground_labels]
        if dataset.regions_class_order is not None:
            return cls(tuple(dataset.regions_class_order))
        return cls(tuple(_region_value(i, regions) for i in range(len(regions))))

    @property
    def is_regions(self) -> bool:
        return self.region_values is not None


def _region_value(index: int, regions: Sequence[tuple[int, ...]]) -> int:
    """Without regions_class_order: a region's own value, i.e. what no smaller nested region claims."""
    own = set(regions[index])
    for other in regions:
        if set(other) < own:
            own -= set(other)
    return min(own) if own else min(regions[index])


def logits_to_probabilities(logits: np.ndarray, semantics: LabelSemantics) -> np.ndarray:
    """Softmax over channels, or a sigmoid per region channel; float32, (c, ...)."""
    logits = logits.astype(np.float32, copy=False)
    if semantics.is_regions:
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    shifted /= shifted.sum(axis=0, keepdims=True)
    return shifted


def probabilities_to_labels(probabilities: np.ndarray, semantics: LabelSemantics) -> np.ndarray:
    """Label map (uint8, or int16 beyond 255 classes) from probabilities (c, ...)."""
    dtype = label_dtype(probabilities.shape[0], semantics)
    if not semantics.is_regions:
        return probabilities.argmax(axis=0).astype(dtype)
    assert semantics.region_values is not None
    out = np.zeros(probabilities.shape[1:], dtype=dtype)
    for channel, value in enumerate(semantics.region_values):
        out[probabilities[channel] > 0.5] = value
    return out


def restore_prediction(
    logits: np.ndarray, properties: CaseProperties, *, plans: Plans, config: Configuration,
    semantics: LabelSemantics, with_probabilities: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (c, *grid) -> (label map, probabilities or None) in the input file's array order (z, y, x)."""
    if with_probabilities:
        cropped = np.stack([resample_to_crop(channel, properties, config=config) for channel in logits])
        probabilities = logits_to_probabilities(cropped, semantics)
        del cropped
        labels = probabilities_to_labels(probabilities, semantics)
        full = place_in_original(probabilities, properties, plans=plans, fill=0.0, leading=1)
        if not semantics.is_regions:  # outside the crop (no body), background is certain
            inside = place_in_original(np.ones(properties.shape_after_crop, dtype=bool), properties, plans=plans,
                                       fill=False)
            full[0][~inside] = 1.0
        return place_in_original(labels, properties, plans=plans), full
    return place_in_original(_streamed_labels(logits, properties, config, semantics), properties, plans=plans), None


def _streamed_labels(logits: np.ndarray, properties: CaseProperties, config: Configuration,
                     semantics: LabelSemantics) -> np.ndarray:
    """Class decision channel by channel, each resampled to the cropped grid only when it is its turn."""
    channels = (resample_to_crop(channel, properties, config=config) for channel in logits)
    return decide_labels(channels, semantics, label_dtype(len(logits), semantics))


def label_dtype(num_channels: int, semantics: LabelSemantics) -> np.dtype:
    """uint8 while every label value fits, int16 beyond 255."""
    largest = max(semantics.region_values) if semantics.region_values else num_channels - 1
    return np.dtype(np.uint8 if largest < 256 else np.int16)


def decide_labels(channels: Iterable[np.ndarray], semantics: LabelSemantics, dtype: np.dtype) -> np.ndarray:
    """Labels from logit maps taken one at a time (so a 100-class export holds two maps, not a hundred): a
    running argmax, ties to the lower class as np.argmax; or, for regions, logit > 0 (sigmoid > 0.5) written in
    channel order. The first map is overwritten (with the running maximum)."""
    if semantics.is_regions:
        assert semantics.region_values is not None
        out: np.ndarray | None = None
        for channel, value in zip(channels, semantics.region_values):
            out = np.zeros(channel.shape, dtype=dtype) if out is None else out
            out[channel > 0] = value
        assert out is not None
        return out
    iterator = iter(channels)
    best = next(iterator)
    labels = np.zeros(best.shape, dtype=dtype)
    for index, candidate in enumerate(iterator, start=1):
        labels[candidate > best] = index
        np.maximum(best, candidate, out=best)
    return labels
