"""Inference engines: run each fold's network with torch, OpenVINO or ONNX Runtime on the CPU.

The sliding window stays autoseg's; only the network call changes. `prepare_network` exports the network
to ONNX once (engine cache, keyed by the checkpoint's hash, patch and input channels), compiles it once per
process for the requested tiles per call and precision, and verifies it against torch on first use (see
select.py). One module per engine registers it in ENGINES; the optional packages are imported only when
an engine compiles, so nothing changes for users who have not installed them.
"""

from autoseg.inference.engines import onnxruntime_engine, openvino_engine, torch_engine  # noqa: F401 (register)
from autoseg.inference.engines.base import ENGINES, PRECISIONS, CompiledNetwork, CompileSpec, Engine, EngineError
from autoseg.inference.engines.cache import CACHE_VARIABLE, CacheEntry, ModelKey, cache_root
from autoseg.inference.engines.select import (
    AUTO_ORDER,
    ENGINE_CHOICES,
    clear_compiled,
    installed_engines,
    prepare_network,
)
from autoseg.inference.engines.verify import RELATIVE_TOLERANCE, Verification, verify

__all__ = [
    "AUTO_ORDER",
    "CACHE_VARIABLE",
    "ENGINES",
    "ENGINE_CHOICES",
    "PRECISIONS",
    "RELATIVE_TOLERANCE",
    "CacheEntry",
    "CompileSpec",
    "CompiledNetwork",
    "Engine",
    "EngineError",
    "ModelKey",
    "Verification",
    "cache_root",
    "clear_compiled",
    "installed_engines",
    "prepare_network",
    "verify",
]
