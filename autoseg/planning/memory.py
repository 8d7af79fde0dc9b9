"""An explicit estimate of GPU memory for training one configuration (GiB, no GPU needed).

    bytes = batch x activation elements x bytes per element(dim)
          + parameters x bytes per parameter
          + fixed overhead

Activation elements and parameters come from the topology's network family
(`autoseg.model.families`): the U-Net's closed-form `autoseg.model.size` (nnU-Net's VRAM proxy), or the
generic estimator that counts the same kinds of tensors on a network built on the meta device for the
other families. The constants are calibrated so that at an 8 GiB budget the planner
reproduces nnU-Net's default planner (reference §4.10); docs/planning.md shows the calibration.
They have NOT been measured on a GPU yet: treat estimates as nnU-Net-equivalent, not as a
measured peak.
"""

from __future__ import annotations

from autoseg.model.contract import Topology
from autoseg.model.families import family_of

GIB = 2.0**30

#: Bytes per counted activation element, per sample. Split: 2 B for the fp16 (AMP) conv output
#: kept for the instance norm's backward + 2 B for the fp16 normalised/activated output kept for
#: the LeakyReLU's backward and the next conv's weight gradient + the rest for gradient buffers,
#: the uncounted skip concatenations and allocator slack (calibrated). 2D needs more than 3D
#: because nnU-Net's two reference values imply it (1.02e9 vs 1.12e9 elements per 8 GB).
ACTIVATION_BYTES = {2: 2.0 + 2.0 + 3.25, 3: 2.0 + 2.0 + 2.5}
#: Bytes per parameter: fp32 weight (4) + fp32 gradient (4) + SGD momentum (4) + the fp16 copy
#: autocast caches during forward and backward (2).
PARAMETER_BYTES = 4.0 + 4.0 + 4.0 + 2.0
#: CUDA context (about 0.5 GiB) plus cuDNN/cuBLAS workspaces (about 0.25 GiB), in bytes.
FIXED_OVERHEAD_BYTES = 0.75 * GIB
#: The planner's smallest batch: the patch shrinks until this many samples fit.
MIN_BATCH_SIZE = 2


def estimate_memory_gb(
    topology: Topology, patch: tuple[int, ...], batch_size: int, *, in_channels: int, num_classes: int
) -> float:
    """Estimated training peak in GiB for `batch_size` samples of `patch` (voxels, array order)."""
    return _fixed_bytes(topology, in_channels, num_classes) / GIB + batch_size * _sample_bytes(
        topology, patch, in_channels, num_classes
    ) / GIB


def fits(
    topology: Topology,
    patch: tuple[int, ...],
    batch_size: int,
    *,
    budget_gb: float,
    in_channels: int,
    num_classes: int,
) -> bool:
    """True when the estimate for `batch_size` samples is within `budget_gb` GiB."""
    estimate = estimate_memory_gb(topology, patch, batch_size, in_channels=in_channels, num_classes=num_classes)
    return estimate <= budget_gb


def batch_capacity(
    topology: Topology, patch: tuple[int, ...], budget_gb: float, *, in_channels: int, num_classes: int
) -> float:
    """How many samples the budget holds after the fixed costs, as a fraction (may be < 0)."""
    free = budget_gb * GIB - _fixed_bytes(topology, in_channels, num_classes)
    return free / _sample_bytes(topology, patch, in_channels, num_classes)


def _sample_bytes(topology: Topology, patch: tuple[int, ...], in_channels: int, num_classes: int) -> float:
    elements = family_of(topology).elements(topology, patch, in_channels=in_channels, num_classes=num_classes)
    return elements * ACTIVATION_BYTES[topology.dim]


def _fixed_bytes(topology: Topology, in_channels: int, num_classes: int) -> float:
    params = family_of(topology).parameters(topology, in_channels=in_channels, num_classes=num_classes)
    return params * PARAMETER_BYTES + FIXED_OVERHEAD_BYTES
