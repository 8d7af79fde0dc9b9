"""`autoseg networks`: every registered network family, with its size when planned for one dataset."""

from __future__ import annotations

from dataclasses import dataclass

from autoseg.dataset.contract import Dataset
from autoseg.errors import PlanError
from autoseg.fingerprint.contract import Fingerprint
from autoseg.model.families import NETWORKS, NetworkFamily
from autoseg.planning.planner import plan

#: The configuration whose sizes are shown: the first one a dataset has.
SHOWN_CONFIGURATIONS = ("3d_fullres", "2d")


@dataclass(frozen=True)
class NetworkSummary:
    """One family; the sizes are those of `configuration` planned for the dataset under the budget
    (None without a dataset, or with `problem` saying why planning failed). Receptive field in voxels
    and mm per axis (array order after the plan's transpose), memory in GiB for the planned batch."""

    name: str
    description: str
    deep_supervision: bool
    configuration: str | None = None
    parameters: int | None = None
    receptive_field: tuple[int, ...] | None = None
    receptive_field_mm: tuple[float, ...] | None = None
    estimated_memory_gb: float | None = None
    problem: str | None = None


def network_summaries(
    fingerprint: Fingerprint | None = None, dataset: Dataset | None = None, *, memory_budget_gb: float = 8.0
) -> list[NetworkSummary]:
    """Every registered family by name; planned for `dataset` when a fingerprint and dataset are given."""
    return [_summary(family, fingerprint, dataset, memory_budget_gb) for family in NETWORKS.families()]


def _summary(family: NetworkFamily, fingerprint: Fingerprint | None, dataset: Dataset | None,
             budget_gb: float) -> NetworkSummary:
    base = NetworkSummary(family.name, family.description, family.deep_supervision)
    if fingerprint is None or dataset is None:
        return base
    try:
        plans = plan(fingerprint, dataset, memory_budget_gb=budget_gb, network=family.name)
    except PlanError as err:
        return NetworkSummary(base.name, base.description, base.deep_supervision, problem=err.message)
    name = next(n for n in (*SHOWN_CONFIGURATIONS, *plans.configurations) if n in plans.configurations)
    config = plans.configurations[name]
    field_mm = tuple(round(f * s, 1) for f, s in zip(config.receptive_field, config.spacing))
    return NetworkSummary(base.name, base.description, base.deep_supervision, configuration=name,
                          parameters=config.parameter_count, receptive_field=config.receptive_field,
                          receptive_field_mm=field_mm, estimated_memory_gb=config.estimated_memory_gb)
