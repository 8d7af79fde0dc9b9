"""What an inference engine is, the registry of engines, and the torch-callable wrapper of a compiled model.

An engine turns one fold's network into a callable with the network's own contract, so the sliding window
(autoseg.inference.sliding) does not know which engine runs: a float32 CPU tensor (tiles, channels, *patch)
in, float32 logits (tiles, classes, *patch) out, spatial axes in array order (z, y, x or y, x). Engines other
than torch run an ONNX export of the network (autoseg.model.onnx_graph) on the CPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoseg.errors import AutosegError, SettingsError
from autoseg.registry import Registry

#: Inference precisions an engine may be compiled for; fp32 is every engine's reference.
PRECISIONS = ("fp32", "bf16")

#: A compiled model on numpy arrays: float32 (tiles, channels, *patch) -> float32 (tiles, classes, *patch).
Runner = Callable[[np.ndarray], np.ndarray]


class EngineError(AutosegError):
    """An engine asked for by name cannot export, compile or reproduce the network's output."""


@dataclass(frozen=True)
class CompileSpec:
    """How one fold's network is compiled.

    patch: the network's spatial input (array order); in_channels: image channels (plus a cascade's one-hot
    channels); tiles: tiles per call (the last call of a volume may bring fewer); precision: the engine's
    inference precision, one of PRECISIONS; threads: intra-op threads of the engine's CPU thread pool.
    """

    patch: tuple[int, ...]
    in_channels: int
    tiles: int = 1
    precision: str = "fp32"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise SettingsError(f"unknown precision {self.precision!r}", hint=f"use one of {', '.join(PRECISIONS)}")
        if self.tiles < 1 or self.threads < 1:
            raise SettingsError("tiles per call and threads must be at least 1",
                                hint="pass --tiles-per-batch 1 or more")


class Engine:
    """One inference engine: whether it is installed, its version, and how it compiles a network.

    Subclasses set the class attributes and implement `compile`; one module per engine registers an
    instance in ENGINES. `module` is the import name that must be importable, `distribution` the pip
    distribution whose version is reported, `extra` the autoseg extra that installs it; `needs_onnx`:
    compile takes the network's ONNX export; `reference`: the engine is torch itself, never verified.
    """

    name: str = ""
    module: str = ""
    distribution: str = ""
    extra: str | None = None
    precisions: tuple[str, ...] = ("fp32",)
    needs_onnx: bool = True
    reference: bool = False

    def installed(self) -> bool:
        """True when the engine's package can be imported (checked without importing it)."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False

    def version(self) -> str:
        """The installed version ("" when it cannot be told): part of every cache key."""
        try:
            return metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            return ""

    def install_hint(self) -> str:
        return f'pip install "autoseg[{self.extra}]"' if self.extra else f"pip install {self.distribution}"

    def compile(self, network: nn.Module, onnx_path: Path | None, spec: CompileSpec,
                workdir: Path | None) -> nn.Module:
        """A callable with the network's contract. onnx_path: the network's ONNX export (engines with
        needs_onnx); workdir: a folder of the engine cache this engine may keep its own files in."""
        raise NotImplementedError


ENGINES: Registry[Engine] = Registry("inference engine")


class CompiledNetwork(nn.Module):
    """A compiled model behind the nn.Module call contract of the network it replaces.

    static_batch: the model was compiled for exactly this many tiles; a smaller batch (the last of a
    volume) is padded with zeros and the extra outputs dropped, a larger one is run in chunks.
    release: hands the engine's intermediate buffers back to the system (None: the engine has no such call).
    """

    def __init__(self, runner: Runner, *, engine: str, precision: str, static_batch: int | None = None,
                 release: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.runner, self.engine, self.precision, self.static_batch = runner, engine, precision, static_batch
        self.release = release

    def release_memory(self) -> None:
        """Free the engine's buffers for intermediate results; the next call allocates them again. Worth it
        after a large volume: an engine keeps them in its own pool, which what follows (the export of the
        labels) cannot reuse, whereas torch's freed activations go back to the heap that the export draws on."""
        if self.release is not None:
            self.release()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise EngineError(f"the {self.engine} engine runs on the CPU, the tiles are on {x.device}",
                              hint="pass --device cpu, or --engine torch for GPUs")
        array = np.ascontiguousarray(x.detach().float().numpy())
        if self.static_batch is None:
            return torch.from_numpy(np.array(self.runner(array), dtype=np.float32, copy=True))
        outputs = []
        for first in range(0, len(array), self.static_batch):
            chunk = array[first:first + self.static_batch]
            count = len(chunk)
            if count < self.static_batch:
                pad = np.zeros((self.static_batch - count, *chunk.shape[1:]), dtype=np.float32)
                chunk = np.concatenate([chunk, pad])
            outputs.append(np.array(self.runner(chunk)[:count], dtype=np.float32, copy=True))
        return torch.from_numpy(np.concatenate(outputs) if len(outputs) > 1 else outputs[0])

    def extra_repr(self) -> str:
        return f"engine={self.engine}, precision={self.precision}, static_batch={self.static_batch}"
