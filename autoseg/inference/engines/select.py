"""Choosing and preparing an engine for one fold's network: export once, compile once, verify once.

`prepare_network(network, engine=..., spec=..., device=...)` returns what the sliding window calls. For
an engine other than torch: the ONNX export is taken from the engine cache (or written there), compiled
once per process (memoised by model key, engine, version, precision, tiles and threads), and verified
against torch on one batch the first time that combination is seen; the verdict is stored in the cache,
so later runs skip it. `auto` tries AUTO_ORDER (fastest first, as measured in docs/inference.md) among the
installed engines and keeps the first that verifies, falling back to torch with a log line; on a GPU or
MPS device it is torch. An engine asked for by name is installed, supported on the device and verified,
or the call raises with what to do.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from autoseg.errors import AutosegError, SettingsError
from autoseg.inference.engines.base import ENGINES, CompileSpec, Engine, EngineError
from autoseg.inference.engines.cache import CACHE_VARIABLE, CacheEntry, ModelKey
from autoseg.inference.engines.verify import Verification, verdict_name, verify
from autoseg.log import get_logger
from autoseg.runtime.device import return_freed_memory

log = get_logger("inference")

#: `auto`'s preference, fastest first on CPUs (torch last: it needs no verification and always works).
AUTO_ORDER = ("openvino", "torch")
ENGINE_CHOICES = ("auto", "torch", "openvino", "onnxruntime")
_EXPORT_BATCH = 2  # the example batch the graph is captured with (a batch of 1 could be specialised away)
_compiled: dict[tuple, nn.Module] = {}


def installed_engines() -> dict[str, str | None]:
    """Every registered engine with its version, or None when it is not installed."""
    return {name: (ENGINES.get(name).version() or "installed") if ENGINES.get(name).installed() else None
            for name in ENGINES}


def clear_compiled() -> None:
    """Forget the compiled models of this process (tests; a long-lived server that swaps models)."""
    _compiled.clear()


def prepare_network(network: nn.Module, *, engine: str = "auto", spec: CompileSpec, device: torch.device,
                    checkpoint: Path | None = None) -> nn.Module:
    """The callable that replaces `network` in the sliding window (see the module docstring).

    network: eval mode on `device`; its deep supervision is switched off here. checkpoint: the file its
    weights came from (the cache key hashes it); None hashes the weights in memory.
    Raises SettingsError for an unknown, uninstalled or unsupported engine asked for by name, EngineError
    when such an engine cannot export, compile or reproduce the network.
    """
    network.deep_supervision = False
    network.eval()
    explicit = engine.lower() != "auto"
    if explicit:
        candidates = [_requested(engine, spec, device)]
    elif device.type != "cpu":
        return network
    else:
        candidates = [ENGINES.get(name) for name in AUTO_ORDER]
        candidates = [c for c in candidates if c.installed() and spec.precision in c.precisions and _exportable(c)]
    for index, candidate in enumerate(candidates):
        following = candidates[index + 1].name if index + 1 < len(candidates) else "torch"
        if candidate.reference:
            return candidate.compile(network, None, spec, None)
        try:
            compiled, verification = _compiled_and_verified(candidate, network, spec, checkpoint)
        except AutosegError as err:
            if explicit:
                raise
            log.warning("the %s engine could not be prepared (%s); falling back to %s", candidate.name, err,
                        following)
            continue
        if verification.ok:
            log.info("engine %s %s (%s, %d tile(s) per call): max |%s - torch| = %.2e, tolerance %.2e",
                     candidate.name, verification.version, spec.precision, spec.tiles, candidate.name,
                     verification.max_abs_diff, verification.tolerance)
            return compiled
        message = (f"the {candidate.name} engine's logits differ from torch's by up to "
                   f"{verification.max_abs_diff:.3g} (tolerance {verification.tolerance:.3g})")
        if explicit:
            raise EngineError(message, hint="use --engine torch (and report this with the model's plans.json)")
        log.warning("%s; falling back to %s", message, following)
    return network


def _requested(name: str, spec: CompileSpec, device: torch.device) -> Engine:
    """The engine asked for by name, if it can run here at all."""
    if name.lower() not in ENGINES:
        raise SettingsError(f"unknown engine {name!r}", hint=f"use one of {', '.join(ENGINE_CHOICES)}")
    engine = ENGINES.get(name)
    if not engine.installed() or not _exportable(engine):
        missing = engine.module if not engine.installed() else "onnx / onnxscript (for the export)"
        raise SettingsError(f"the {engine.name} engine is not installed ({missing} is missing)",
                            hint=f'{engine.install_hint()}, or choose --engine torch or auto')
    if not engine.reference and device.type != "cpu":
        raise SettingsError(f"the {engine.name} engine runs on the CPU, prediction is set to run on {device}",
                            hint="pass --device cpu, or use --engine torch (or auto) on a GPU")
    if spec.precision not in engine.precisions:
        raise SettingsError(f"the {engine.name} engine has no {spec.precision} precision",
                            hint=f"use {' or '.join(engine.precisions)}, or another engine")
    return engine


def _exportable(engine: Engine) -> bool:
    """Engines that run the ONNX export need onnx and onnxscript (torch's exporter) beside them."""
    if not engine.needs_onnx:
        return True
    return all(importlib.util.find_spec(module) is not None for module in ("onnx", "onnxscript"))


def _compiled_and_verified(engine: Engine, network: nn.Module, spec: CompileSpec,
                           checkpoint: Path | None) -> tuple[nn.Module, Verification]:
    """Compile (once per process), verify (once per cache entry and verdict name)."""
    entry = CacheEntry(ModelKey.of(network, spec, checkpoint=checkpoint))
    version = engine.version()
    memo = (entry.key.digest(), engine.name, version, spec)
    first_in_process = memo not in _compiled
    if first_in_process:
        onnx_path = _exported(network, spec, entry, checkpoint) if engine.needs_onnx else None
        try:
            _compiled[memo] = engine.compile(network, onnx_path, spec, entry.workdir(engine.name))
        except Exception as err:  # engines raise their own kinds for graphs they cannot compile
            raise EngineError(f"the {engine.name} engine cannot compile the network ({type(err).__name__}: "
                              f"{str(err)[:300]})", path=onnx_path,
                              hint=f"update {engine.distribution}, or use --engine torch") from err
    compiled = _compiled[memo]
    name = verdict_name(engine.name, version, spec)
    stored = entry.verdict(name)
    verification = Verification.from_record(stored) if stored else None
    if verification is None:
        try:
            verification = verify(network, compiled, spec, engine=engine.name, version=version)
        except Exception as err:  # an engine that compiles but cannot run this input
            raise EngineError(f"the {engine.name} engine fails on a batch of tiles ({type(err).__name__}: "
                              f"{str(err)[:300]})", hint=f"update {engine.distribution}, or use --engine torch"
                              ) from err
        try:
            entry.record_verdict(name, verification.to_record())
        except OSError as err:  # the verdict is only a shortcut for later runs
            log.warning("could not store the %s engine's verification in %s (%s)", engine.name, entry.path, err)
    if first_in_process:
        return_freed_memory()  # the export's and the torch reference's buffers: the engine has its own pool
    return compiled, verification


def _exported(network: nn.Module, spec: CompileSpec, entry: CacheEntry, checkpoint: Path | None) -> Path:
    """The cached ONNX export of the network, written on first use."""
    if entry.onnx.is_file():
        return entry.onnx
    from autoseg.model import onnx_graph

    parameter = next(network.parameters(), None)
    if parameter is not None and (parameter.device.type != "cpu" or parameter.dtype != torch.float32):
        raise EngineError("the network must be float32 on the CPU to be exported",
                          hint="load it with --device cpu")
    example = torch.randn(_EXPORT_BATCH, spec.in_channels, *spec.patch, generator=torch.Generator().manual_seed(0))
    log.info("exporting the network to ONNX for the engine cache (%s), once per checkpoint", entry.path)
    try:
        exporter = onnx_graph.export_network(network, example, entry.onnx)
        entry.describe(checkpoint=checkpoint, exporter=exporter)
    except OSError as err:  # a read-only or full home folder
        raise EngineError(f"the engine cache cannot be written ({err})", path=entry.path,
                          hint=f"set {CACHE_VARIABLE} to a writable folder") from err
    return entry.onnx
