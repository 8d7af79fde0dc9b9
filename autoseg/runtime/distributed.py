"""Multi-process training context from torchrun's environment (DDP), single-process otherwise."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

from autoseg.runtime.device import pick_device, precision_dtype

PROCESS_GROUP_TIMEOUT_MIN = 60


@dataclass(frozen=True)
class RuntimeContext:
    """Where this process runs: its device, its rank among `world_size`, and its AMP dtype."""

    device: Any
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    amp_dtype: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str = "auto", *, amp: bool = True, precision: str = "auto") -> RuntimeContext:
        """Read RANK / LOCAL_RANK / WORLD_SIZE (set by torchrun) and join the process group."""
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        chosen = pick_device(device, local_rank=local_rank)
        if world_size > 1:
            _init_process_group(chosen)
        return cls(device=chosen, rank=rank, local_rank=local_rank, world_size=world_size,
                   amp_dtype=precision_dtype(chosen, precision if amp else "fp32", purpose="train"))


def _init_process_group(device: Any) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        # rank 0 alone prepares some inputs (a cascade's previous-stage maps) while the others wait at a
        # barrier: the default 10 minutes can be too short on a slow shared file system
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=PROCESS_GROUP_TIMEOUT_MIN))


def barrier(context: RuntimeContext) -> None:
    if context.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(value: Any, context: RuntimeContext) -> Any:
    """Sum a tensor over all processes (in place) and return it."""
    if context.distributed:
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_mean(value: Any, context: RuntimeContext) -> Any:
    """Average a tensor over all processes (in place) and return it."""
    if context.distributed:
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= context.world_size
    return value


def replicas_identical(model: Any, context: RuntimeContext) -> bool:
    """True when every rank holds the same parameters (compared by max and min of a checksum)."""
    if not context.distributed:
        return True
    import torch
    import torch.distributed as dist

    total = sum(p.detach().double().sum() for p in model.parameters())
    values = torch.stack([total, -total]).to(context.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return bool(torch.isclose(values[0], -values[1], rtol=0, atol=1e-9 * max(1.0, abs(float(total)))))


def wrap_model(model: Any, context: RuntimeContext, *, find_unused: bool = False) -> Any:
    """DistributedDataParallel around `model` when running under torchrun, else `model` itself.

    `find_unused` is needed when some parameters get no gradient (deep-supervision heads when it is off).
    """
    if not context.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def unwrap_model(model: Any) -> Any:
    """The plain network inside DDP (`.module`), torch.compile (`._orig_mod`) or autoseg's
    compile fallback (`.module`), however nested: what checkpoints save and load."""
    from torch import nn

    while True:
        inner = getattr(model, "_orig_mod", None)
        inner = getattr(model, "module", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def shutdown(context: RuntimeContext) -> None:
    if context.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
