"""Rows of the printed plans table: one per configuration, raw values plus plain-language notes."""

from __future__ import annotations

from typing import Any

from autoseg.model.families import DEFAULT_UPSAMPLING, family_of
from autoseg.planning.contract import Configuration, Plans

#: Flag an axis whose receptive field covers less than this fraction of the patch.
SMALL_FIELD_FRACTION = 0.5


def summarize(plans: Plans) -> list[dict[str, Any]]:
    """One row per configuration, in plan order. Per-axis values are in array order after the
    plan's transpose; spacing and receptive field in mm, memory in GiB, parameters in millions.

    Keys: name, network, spacing_mm, median_shape, patch, batch, stages, features, first_kernel,
    first_stride, receptive_field, receptive_field_mm, memory_gib, params_m, notes (list of str).
    """
    return [_row(config, plans.memory_budget_gb) for config in plans.configurations.values()]


def _row(config: Configuration, budget_gb: float) -> dict[str, Any]:
    topology = config.topology
    field_mm = tuple(round(f * s, 1) for f, s in zip(config.receptive_field, config.spacing))
    return {
        "name": config.name,
        "network": _network(config),
        "spacing_mm": tuple(round(s, 3) for s in config.spacing),
        "median_shape": config.median_shape,
        "patch": config.patch_size,
        "batch": config.batch_size,
        "stages": topology.n_stages,
        "features": "-".join(str(f) for f in topology.features_per_stage),
        "first_kernel": topology.kernel_sizes[0],
        "first_stride": topology.strides[1] if topology.n_stages > 1 else topology.strides[0],
        "receptive_field": config.receptive_field,
        "receptive_field_mm": field_mm,
        "memory_gib": round(config.estimated_memory_gb, 2),
        "params_m": round(config.parameter_count / 1e6, 2),
        "notes": list(config.notes) + _notes(config, budget_gb),
    }


def _network(config: Configuration) -> str:
    """The family name, with the upsampling step where it is not the default one."""
    family = family_of(config.topology)
    upsampling = config.topology.upsampling
    return family.name if not family.upsampling or upsampling == DEFAULT_UPSAMPLING else f"{family.name} ({upsampling})"


def _notes(config: Configuration, budget_gb: float) -> list[str]:
    notes = []
    for axis, (field, patch) in enumerate(zip(config.receptive_field, config.patch_size)):
        if field < SMALL_FIELD_FRACTION * patch:
            notes.append(f"receptive field {field} smaller than half the patch ({patch}) along axis {axis}")
    padded = [str(axis) for axis, (p, m) in enumerate(zip(config.patch_size, config.median_shape)) if p > m]
    if padded:
        notes.append(f"patch larger than the median image along axis {', '.join(padded)} "
                     "(padded to a multiple of the total stride)")
    if config.estimated_memory_gb > budget_gb:
        notes.append(f"estimate {config.estimated_memory_gb:.2f} GiB is above the {budget_gb:g} GiB budget: "
                     "the batch is the budget's capacity rounded to nearest, as in nnU-Net")
    if config.previous_stage:
        notes.append(f"needs the {config.previous_stage} prediction as input (cascade)")
    return notes
