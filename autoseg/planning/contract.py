"""The Plans contract: one Configuration per setup (2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres)."""

from __future__ import annotations

from dataclasses import dataclass

from autoseg.fingerprint.contract import IntensityStats
from autoseg.model.contract import Topology

PLANS_FORMAT = 1


@dataclass(frozen=True)
class Resampling:
    """Interpolation orders for preprocessing and export.

    Along an axis whose spacing is more than `anisotropy_threshold` times the finest one,
    resampling is done separately with `order_z` (nearest neighbour by default).
    """

    order_image: int = 3
    order_label: int = 1
    order_probabilities: int = 1
    order_z: int = 0
    anisotropy_threshold: float = 3.0


@dataclass(frozen=True)
class Configuration:
    """Everything needed to preprocess for, train and run one setup. Axis order: array (z, y, x)
    after the plan's transpose; 2d configurations list only the in-plane axes."""

    name: str
    spacing: tuple[float, ...]
    median_shape: tuple[int, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    batch_dice: bool
    normalization: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    resampling: Resampling
    topology: Topology
    data_id: str
    estimated_memory_gb: float
    parameter_count: int
    receptive_field: tuple[int, ...]
    previous_stage: str | None = None
    next_stage: str | None = None
    #: Why the planner decided as it did where a rule bounded the result (e.g. the 5 % batch cap).
    notes: tuple[str, ...] = ()

    @property
    def dim(self) -> int:
        return len(self.patch_size)


@dataclass(frozen=True)
class Plans:
    """The planner's output for one dataset and memory budget."""

    dataset_name: str
    plans_name: str
    fingerprint_hash: str
    memory_budget_gb: float
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    original_median_spacing: tuple[float, ...]
    original_median_shape: tuple[int, ...]
    channel_names: tuple[str, ...]
    intensity: tuple[IntensityStats, ...]
    num_classes: int
    configurations: dict[str, Configuration]
    format: int = PLANS_FORMAT
