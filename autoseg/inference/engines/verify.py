"""Verification: does a compiled engine reproduce the torch network's logits on one batch of tiles?

The reference is the torch network in fp32; the input a fixed-seed standard-normal batch of `tiles` tiles
(the network sees intensity-normalised data, mean 0 and std 1). The engine agrees when

    max |engine - torch| <= RELATIVE_TOLERANCE[precision] * max(1, range of the torch logits)

1e-3 of the logit range in fp32 admits the reordering of float32 sums by another engine's kernels
(observed: 1e-6 to 2e-3 of the range) and catches a wrong graph (differences of the order of the range);
bf16 keeps 8 bits of mantissa, so through a deep network its logits drift by a few percent of the range:
5e-2 still catches a broken graph but is a sanity check, not an accuracy guarantee.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from autoseg.inference.engines.base import CompileSpec

RELATIVE_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}
_SEED = 0


@dataclass(frozen=True)
class Verification:
    """The outcome of comparing one engine with torch (stored in the engine cache's verified.json)."""

    engine: str
    version: str
    precision: str
    tiles: int
    max_abs_diff: float
    tolerance: float
    ok: bool

    def to_record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> Verification | None:
        try:
            return cls(**record)
        except TypeError:  # a record of another format: verify again
            return None


def verdict_name(engine: str, version: str, spec: CompileSpec) -> str:
    """The verified.json key: engine, its version, precision and tiles per call."""
    return f"{engine}-{version}-{spec.precision}-tiles{spec.tiles}"


def verify(network: nn.Module, compiled: nn.Module, spec: CompileSpec, *, engine: str,
           version: str) -> Verification:
    """Run both on one random batch (spec.tiles, spec.in_channels, *spec.patch) and compare (see module)."""
    generator = torch.Generator().manual_seed(_SEED)
    tiles = torch.randn(spec.tiles, spec.in_channels, *spec.patch, generator=generator)
    with torch.inference_mode():
        expected = network(tiles).float()
        actual = compiled(tiles).float()
    if actual.shape != expected.shape:
        difference = math.inf
    else:
        difference = float((actual - expected).abs().max())
    spread = float(expected.max() - expected.min())
    tolerance = RELATIVE_TOLERANCE[spec.precision] * max(1.0, spread)
    return Verification(engine=engine, version=version, precision=spec.precision, tiles=spec.tiles,
                        max_abs_diff=difference, tolerance=tolerance,
                        ok=bool(difference <= tolerance))  # NaN and inf fail
