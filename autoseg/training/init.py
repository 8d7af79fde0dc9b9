"""How a network's output heads start: as built (nnU-Net's He init) or at the class prior.

With the He init the 1x1 heads start with zero biases and random weights, so at step 0 every voxel is
about equally likely to be any class while nearly all voxels are background: the first steps push
everything to background, then the foreground is learnt as one structure given to whichever class the
random head favours, and which class stays behind depends on the draw (docs/training.md). The prior
init (Lin et al. 2017, "Focal loss", section 4.1) sets the head biases to the log class frequencies of
the training patches, so the start is already near the prior; the head weights and the rest of the
network keep the same He draws, so `--init nnunet` reproduces the old initial weights exactly.
`prior_small` and `prior_zero` also shrink the head weights (measured slower: the body gets little
gradient through small heads).

Registered by name in `OUTPUT_INITS`; a model folder stores the name in training.json.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoseg.log import get_logger
from autoseg.planning.contract import Configuration
from autoseg.registry import Registry

log = get_logger("training")

#: Patches drawn (without augmentation) to measure the class frequencies the loss will see.
FREQUENCY_PATCHES = 64
#: Offset of the frequency draw's seed from the run's seed (its own stream, not the training batches').
FREQUENCY_SEED_OFFSET = 17
#: The smallest frequency a prior may take: a class not met in the drawn patches starts at this.
MIN_FREQUENCY = 1e-3

#: (network, frequencies, sigmoid) -> None; `frequencies` is called only by inits that need it.
OutputInit = Callable[[nn.Module, Callable[[], np.ndarray], bool], None]
OUTPUT_INITS: Registry[OutputInit] = Registry("output initialisation")


def output_heads(network: nn.Module) -> list[nn.Module]:
    """The network's segmentation heads (1x1 convs with bias), highest resolution first."""
    heads = getattr(network, "output_heads", None)
    if heads is None:
        raise TypeError(f"{type(network).__name__} does not expose output_heads; it cannot be prior-initialised")
    return list(heads)


@OUTPUT_INITS.register("nnunet")
def keep_he_init(network: nn.Module, frequencies: Callable[[], np.ndarray], sigmoid: bool) -> None:
    """nnU-Net's init: every conv He-initialised with zero bias, heads included (nothing to change)."""


def _prior(network: nn.Module, frequencies: Callable[[], np.ndarray], sigmoid: bool, weight_scale: float) -> None:
    """Head biases at the prior; head weights kept from the He init, multiplied by `weight_scale`."""
    bias = torch.from_numpy(prior_bias(frequencies(), sigmoid=sigmoid))
    with torch.no_grad():
        for head in output_heads(network):
            head.weight.mul_(weight_scale)
            head.bias.copy_(bias.to(head.bias.dtype))


@OUTPUT_INITS.register("prior")
def prior_init(network: nn.Module, frequencies: Callable[[], np.ndarray], sigmoid: bool) -> None:
    """Head biases at the prior, He head weights kept (the measured best, docs/training.md)."""
    _prior(network, frequencies, sigmoid, 1.0)


@OUTPUT_INITS.register("prior_small")
def prior_small_init(network: nn.Module, frequencies: Callable[[], np.ndarray], sigmoid: bool) -> None:
    """Head biases at the prior, He head weights x 0.1 (Lin et al.'s small head weights; measured slower)."""
    _prior(network, frequencies, sigmoid, 0.1)


@OUTPUT_INITS.register("prior_zero")
def prior_zero_init(network: nn.Module, frequencies: Callable[[], np.ndarray], sigmoid: bool) -> None:
    """Head biases at the prior, zero head weights: every voxel starts exactly at the frequencies, but
    the body gets no gradient until the heads grow (measured: a plateau of ~40 iterations)."""
    _prior(network, frequencies, sigmoid, 0.0)


def prior_bias(frequencies: np.ndarray, *, sigmoid: bool) -> np.ndarray:
    """Bias whose softmax (or per-channel sigmoid) equals `frequencies`, floored at MIN_FREQUENCY."""
    f = np.clip(np.asarray(frequencies, dtype=np.float64), MIN_FREQUENCY, 1 - MIN_FREQUENCY)
    if sigmoid:
        return np.log(f / (1 - f)).astype(np.float32)
    f = f / f.sum()
    return (np.log(f) - np.log(f).mean()).astype(np.float32)


def patch_class_frequencies(
    cache: str | Path, case_ids: Sequence[str], config: Configuration, *, num_classes: int, batch_size: int,
    oversample: float, seed: int, regions: Sequence[Sequence[int]] | None = None, ignore_label: int | None = None,
) -> np.ndarray:
    """Fraction of training-patch voxels per class (num_classes,), or per region (len(regions),).

    Drawn as the loader draws (same oversampling, no augmentation) from FREQUENCY_PATCHES patches,
    so the prior is what the loss sees, background outside the body included; ignore-label voxels
    are left out. Deterministic for a seed, so every DDP rank computes the same prior.
    """
    from autoseg.training.data import BatchSource

    source = BatchSource(cache, case_ids, config, batch_size=batch_size, oversample=oversample,
                         augmentation="none", seed=seed, deep_supervision=False)
    n_batches = max(1, math.ceil(FREQUENCY_PATCHES / batch_size))
    size = num_classes if regions is None else len(regions)
    counts, total = np.zeros(size, np.float64), 0
    for index in range(n_batches):
        labels = source(index)["target"][0].astype(np.int64).ravel()
        if ignore_label is not None:
            labels = labels[labels != ignore_label]
        total += labels.size
        if regions is None:
            counts += np.bincount(labels, minlength=num_classes)[:num_classes]
        else:
            counts += [np.isin(labels, region).sum() for region in regions]
    return counts / max(total, 1)


def initialise_outputs(
    network: nn.Module, init: str, *, cache: str | Path, case_ids: Sequence[str], config: Configuration,
    num_classes: int, batch_size: int, oversample: float, seed: int,
    regions: Sequence[Sequence[int]] | None = None, ignore_label: int | None = None,
) -> None:
    """Apply the registered output init `init` to `network`'s heads; the class frequencies are measured
    (patch_class_frequencies, from the run's `seed`) only when the init needs them."""
    def frequencies() -> np.ndarray:
        found = patch_class_frequencies(cache, case_ids, config, num_classes=num_classes, batch_size=batch_size,
                                        oversample=oversample, seed=seed + FREQUENCY_SEED_OFFSET, regions=regions,
                                        ignore_label=ignore_label)
        log.info("output heads start at the class frequencies of %d training patches: %s", FREQUENCY_PATCHES,
                 ", ".join(f"{f:.4f}" for f in found))
        return found

    OUTPUT_INITS.get(init)(network, frequencies, regions is not None)
