"""How many CPUs this process may really use (containers and batch jobs see more cores than they get)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path


def allotted_cpus(
    *, affinity: int | None = None, cgroup_root: str | Path = "/sys/fs/cgroup",
    self_cgroup: str | None = None, environ: Mapping[str, str] | None = None,
) -> int:
    """CPUs this process may actually use: the minimum of its CPU affinity, its cgroup CPU quota
    (v2 `cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`, rounded up) and SLURM_CPUS_PER_TASK.

    A container or batch job often sees every core of the host but may use only a few; sizing the
    worker pool from os.cpu_count() then oversubscribes and starves the GPU. Every source can be
    faked: `affinity` (count), `cgroup_root` (folder), `self_cgroup` (the text of /proc/self/cgroup)
    and `environ`.
    """
    environ = os.environ if environ is None else environ
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if self_cgroup is None:
        self_cgroup = _read_text(Path("/proc/self/cgroup")) or ""
    limits = [affinity]
    quota = _cgroup_quota(Path(cgroup_root), self_cgroup)
    if quota is not None:
        limits.append(math.ceil(quota))
    slurm = environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        limits.append(int(slurm))
    return max(1, min(limits))


def default_workers(cpus: int | None = None, *, ranks: int | None = None) -> int:
    """Worker processes for one training process given `cpus` allotted CPUs (measured when None).

    The CPUs are shared by the `ranks` training processes on this node (default: torchrun's
    LOCAL_WORLD_SIZE, else 1), so four GPU ranks on 32 CPUs get 8 each, not 32 each. Of its share a
    rank uses all up to 2, else one fewer, leaving a CPU to the process that feeds the GPU; at most 32.
    """
    cpus = allotted_cpus() if cpus is None else cpus
    if ranks is None:
        local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
        ranks = int(local) if local.isdigit() and int(local) > 0 else 1
    share = max(1, cpus // max(1, ranks))
    return max(1, min(32, share if share <= 2 else share - 1))


def _cgroup_quota(root: Path, self_cgroup: str) -> float | None:
    """The tightest CPU quota (in CPUs) over this process's cgroup and its ancestors, None if unlimited."""
    quotas = []
    for hierarchy, controllers, path in _cgroup_lines(self_cgroup):
        if hierarchy == "0" and not controllers:  # v2
            for folder in _ancestors(root, path):
                parts = (_read_text(folder / "cpu.max") or "").split()
                if len(parts) == 2 and parts[0] != "max":
                    quotas.append(int(parts[0]) / int(parts[1]))
        elif "cpu" in controllers.split(","):  # v1
            for folder in _ancestors(root / controllers, path):
                quota, period = _read_text(folder / "cpu.cfs_quota_us"), _read_text(folder / "cpu.cfs_period_us")
                if quota and period and int(quota) > 0 and int(period) > 0:
                    quotas.append(int(quota) / int(period))
    for top in (root / "cpu.max",):  # a container's own root, also when /proc/self/cgroup is unhelpful
        parts = (_read_text(top) or "").split()
        if len(parts) == 2 and parts[0] != "max":
            quotas.append(int(parts[0]) / int(parts[1]))
    return min(quotas) if quotas else None


def _cgroup_lines(text: str) -> list[tuple[str, str, str]]:
    lines = []
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) == 3:
            lines.append((parts[0], parts[1], parts[2]))
    return lines


def _ancestors(root: Path, path: str) -> list[Path]:
    parts = [p for p in path.strip("/").split("/") if p]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None
