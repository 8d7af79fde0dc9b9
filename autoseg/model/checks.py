"""Shape checks every network family runs: on its topology when built (the mistakes a hand-edited plans file
can make) and on its input in forward (a clear error instead of a shape mismatch deep inside a conv).

Pure Python on the topology; the input check needs only `x.ndim` and `x.shape`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autoseg.errors import SettingsError
from autoseg.model.contract import Topology


def check_topology(topology: Topology, *, in_channels: int, num_classes: int, family: str = "U-Net",
                   min_stages: int = 1, decoder: bool = True) -> None:
    """SettingsError listing every inconsistency of `topology` for a `family` network.

    `decoder`: the family reads `convs_per_decoder_stage` (one entry per decoder level, n_stages - 1).
    """
    n, dim = topology.n_stages, topology.dim
    problems = [] if dim in (2, 3) else [f"dim is {dim}, not 2 or 3"]
    if n < min_stages:
        problems.append(f"{n} stage(s); a {family} needs at least {min_stages}")
    per_stage = {"kernel_sizes": topology.kernel_sizes, "strides": topology.strides,
                 "convs_per_stage": topology.convs_per_stage}
    problems += [f"{name} has {len(v)} entries for {n} stages" for name, v in per_stage.items() if len(v) != n]
    if decoder and len(topology.convs_per_decoder_stage) != n - 1:
        problems.append(f"convs_per_decoder_stage has {len(topology.convs_per_decoder_stage)} entries, not {n - 1}")
    if any(len(a) != dim for a in (*topology.kernel_sizes, *topology.strides)):
        problems.append(f"every kernel size and stride needs {dim} entries")
    if topology.strides and any(s != 1 for s in topology.strides[0]):
        problems.append(f"strides[0] is {topology.strides[0]}; stage 0 must not downsample")
    if any(k % 2 == 0 for kernel in topology.kernel_sizes for k in kernel):
        problems.append("kernel sizes must be odd (same padding)")
    counts = (*topology.convs_per_stage, *(topology.convs_per_decoder_stage if decoder else ()))
    if min(counts, default=1) < 1 or min(topology.features_per_stage, default=1) < 1:
        problems.append("conv counts and feature counts must be at least 1")
    if in_channels < 1 or num_classes < 1:
        problems.append(f"in_channels={in_channels} and num_classes={num_classes} must be at least 1")
    if problems:
        raise SettingsError(f"invalid network topology ({family}): " + "; ".join(problems),
                            hint="re-run planning (autoseg plan, with --network for a family), or fix the "
                                 "topology in the plans file by hand")


def check_input(x: Any, *, dim: int, in_channels: int, stride: Sequence[int]) -> None:
    """SettingsError unless x is (b, in_channels, *spatial) with `dim` spatial axes, each divisible by
    its `stride` (the network's total stride, or the stride it really needs)."""
    if x.ndim != dim + 2 or x.shape[1] != in_channels:
        raise SettingsError(
            f"network input has shape {tuple(x.shape)}, expected (b, {in_channels}, {', '.join(['n'] * dim)}) "
            f"for this {dim}D network with {in_channels} input channel(s)",
            hint="feed batches shaped (b, c, z, y, x) (3D) or (b, c, y, x) (2D) with the planned channels")
    spatial = tuple(int(n) for n in x.shape[2:])
    stride = tuple(int(s) for s in stride)
    if any(n % s for n, s in zip(spatial, stride)):
        fixed = tuple(-(-n // s) * s for n, s in zip(spatial, stride))
        raise SettingsError(f"input spatial shape {spatial} is not divisible by the network's total stride {stride}",
                            hint=f"pad (or crop) each axis to a multiple of its total stride, e.g. to {fixed}")
