"""What a bug report needs: versions, CUDA, GPUs, the CPUs this job may use, and the path settings."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from autoseg.paths import data_root, root_variable
from autoseg.runtime.cpus import allotted_cpus

#: Distributions whose versions matter for reproducing a problem (import names differ for some).
PACKAGES = ("torch", "numpy", "scipy", "SimpleITK", "nibabel", "batchgenerators", "typer", "rich", "matplotlib",
            "onnx", "onnxruntime", "openvino")
_DISTRIBUTED_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID",
                          "SLURM_ARRAY_TASK_ID", "SLURM_CPUS_PER_TASK", "CUDA_VISIBLE_DEVICES")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_gib: float
    capability: str  # e.g. "8.0"
    bf16: bool


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's name and its native bf16 support (Linux /proc/cpuinfo flags; False where unknown)."""

    name: str
    avx512_bf16: bool  # AVX512-BF16: bf16 dot products (Intel Cooper Lake+, AMD Zen 4+)
    amx_bf16: bool  # AMX tiles with bf16 (Intel Sapphire Rapids+)

    @property
    def native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx_bf16


@dataclass(frozen=True)
class PathSetting:
    kind: str  # raw, preprocessed or results
    path: str
    variable: str | None  # the environment variable that set it; None: the ./autoseg_data default
    exists: bool


@dataclass(frozen=True)
class EnvironmentReport:
    autoseg: str
    python: str
    platform: str
    packages: dict[str, str | None]  # None: not installed
    torch_cuda: str | None  # the CUDA version torch was built with; None for a CPU build
    cudnn: int | None
    gpus: tuple[GpuInfo, ...]
    mps: bool
    cpus_host: int
    cpus_allotted: int  # what autoseg sizes its worker pools from
    cpu: CpuFeatures
    engines: dict[str, str | None]  # inference engines (autoseg predict --engine): version, None if not installed
    paths: tuple[PathSetting, ...]
    job: dict[str, str]  # torchrun / SLURM / CUDA_VISIBLE_DEVICES variables that are set


def environment_report() -> EnvironmentReport:
    """Collect the report; never raises for a missing package or an absent GPU."""
    import autoseg

    torch_cuda, cudnn, gpus, mps = _torch_devices()
    return EnvironmentReport(
        autoseg=autoseg.__version__, python=sys.version.split()[0], platform=platform.platform(),
        packages={name: _version(name) for name in PACKAGES}, torch_cuda=torch_cuda, cudnn=cudnn, gpus=gpus,
        mps=mps, cpus_host=os.cpu_count() or 1, cpus_allotted=allotted_cpus(), cpu=cpu_features(),
        engines=_engines(), paths=_paths(),
        job={name: os.environ[name] for name in _DISTRIBUTED_VARIABLES if name in os.environ})


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> CpuFeatures:
    """Read the first processor's model name and flags; an unreadable file gives the platform's name only."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return CpuFeatures(name=name, avx512_bf16=False, amx_bf16=False)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            name = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    return CpuFeatures(name=name, avx512_bf16="avx512_bf16" in flags, amx_bf16="amx_bf16" in flags)


#: The inference engines (autoseg.inference.engines; `predict --engine`) and the package each needs. Read
#: from package metadata: the runtime layer does not import inference, and nothing heavy is loaded.
ENGINE_PACKAGES = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}


def _engines() -> dict[str, str | None]:
    return {engine: _version(package) for engine, package in ENGINE_PACKAGES.items()}


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _torch_devices() -> tuple[str | None, int | None, tuple[GpuInfo, ...], bool]:
    try:
        import torch
    except ImportError:
        return None, None, (), False
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(GpuInfo(index=index, name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                                capability=f"{props.major}.{props.minor}", bf16=props.major >= 8))
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    mps = bool(getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available())
    return torch.version.cuda, cudnn, tuple(gpus), mps


def _paths() -> tuple[PathSetting, ...]:
    settings = []
    for kind in ("raw", "preprocessed", "results"):
        path = data_root(kind)
        settings.append(PathSetting(kind, str(path), root_variable(kind), path.is_dir()))
    return tuple(settings)
