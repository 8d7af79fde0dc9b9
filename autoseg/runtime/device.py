"""Device choice, mixed precision and seeding: the only place that asks torch about hardware."""

from __future__ import annotations

import os
import random
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from autoseg.errors import SettingsError
from autoseg.log import get_logger

log = get_logger("runtime")


def pick_device(spec: str = "auto", *, local_rank: int = 0) -> Any:
    """A torch.device from "auto" | "cpu" | "cuda" | "cuda:N" | "mps".

    "auto" takes this process's GPU (by LOCAL_RANK under torchrun), then Apple's MPS, then the CPU.
    """
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise SettingsError(f"unknown device {spec!r}", hint="use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(
                "CUDA was requested but torch sees no GPU",
                hint="check `nvidia-smi` and that a CUDA build of torch is installed, or use --device cpu",
            )
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SettingsError("MPS was requested but is not available", hint="use --device cpu")
    return device


#: `--precision` values. auto: mixed precision on CUDA (bf16 where supported, else fp16), fp32 elsewhere.
PRECISIONS = ("auto", "fp32", "bf16")
#: Whether `auto` takes bf16 on CPUs with native bf16, per purpose: only once measured equivalent on the
#: real data (issue 16: fold-validation Dice within 0.005 per class, argmax agreement >= 99.5 %). Prediction:
#: measured on two real Hippocampus models, torch and OpenVINO. Training: one epoch on Hippocampus fold 0, same
#: seed, bf16 0.8455 / 0.8307 against fp32 0.8465 / 0.8299, 2.4x faster (AMX; docs/benchmarks.md).
CPU_BF16_BY_DEFAULT = {"predict": True, "train": True}
#: Environment override of `auto` on CPUs: fp32 or bf16 (bf16 still only where it is native).
AUTO_PRECISION_ENV = "AUTOSEG_CPU_AUTO_PRECISION"


def amp_dtype(device: Any, *, enabled: bool = True, cpu_bf16: bool = False, purpose: str = "predict") -> Any:
    """The autocast dtype of `precision_dtype(device, ...)` for the older flags: `enabled` False = fp32,
    `cpu_bf16` = bf16 on CPU (1.7-2.9x faster prediction on CPUs with native bf16, docs/benchmarks.md);
    `purpose` as in precision_dtype (training steps pass "train")."""
    chosen = "bf16" if cpu_bf16 and device.type == "cpu" else "auto" if enabled else "fp32"
    return precision_dtype(device, chosen, purpose=purpose)


def precision_dtype(device: Any, precision: str = "auto", *, purpose: str = "predict") -> Any:
    """The autocast dtype for `precision` on `device` (None = fp32); SettingsError for an unknown value or
    bf16 on a GPU without it. `purpose` (predict or train) decides `auto` on CPUs (cpu_auto_is_bf16).
    Axis-free: it only decides the arithmetic."""
    import torch

    if precision not in PRECISIONS:
        raise SettingsError(f"unknown precision {precision!r}", hint=f"use one of: {', '.join(PRECISIONS)}")
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        if precision != "fp32":
            log.info("mixed precision is off on %s", device.type)
        return None
    if device.type == "cpu":
        if precision == "bf16" or (precision == "auto" and cpu_auto_is_bf16(purpose)):
            if not cpu_has_native_bf16():
                log.warning("bf16 on a CPU without native bf16 (AVX512-BF16 / AMX) is emulated and slow")
            return torch.bfloat16
        return None
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise SettingsError("this GPU has no bf16", hint="use --precision auto (fp16 with loss scaling) or fp32")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def precision_name(dtype: Any) -> str:
    """The `--precision` word for an autocast dtype of precision_dtype: fp32 (None), bf16 or fp16."""
    import torch

    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def arithmetic_name(dtype: Any) -> str:
    """The training log's words for an autocast dtype: fp32, bf16 autocast or fp16 autocast."""
    return precision_name(dtype) + ("" if dtype is None else " autocast")


def cpu_auto_is_bf16(purpose: str = "predict") -> bool:
    """Whether `--precision auto` computes in bf16 on this CPU for `purpose` (predict or train): where bf16
    is native and measured equivalent (CPU_BF16_BY_DEFAULT), unless AUTOSEG_CPU_AUTO_PRECISION says fp32."""
    chosen = os.environ.get(AUTO_PRECISION_ENV, "").strip().lower()
    if chosen not in ("", "fp32", "bf16"):
        raise SettingsError(f"{AUTO_PRECISION_ENV}={chosen!r} is neither fp32 nor bf16",
                            hint=f"set {AUTO_PRECISION_ENV} to fp32 or bf16, or unset it")
    wanted = chosen == "bf16" if chosen else CPU_BF16_BY_DEFAULT.get(purpose, False)
    return wanted and cpu_has_native_bf16()


def cpu_has_native_bf16() -> bool:
    """True when the CPU lists avx512_bf16 or amx_bf16 (Linux; False where it cannot tell)."""
    from autoseg.runtime.report import cpu_features

    features = cpu_features()
    return features.avx512_bf16 or features.amx_bf16


def autocast(device: Any, dtype: Any) -> AbstractContextManager[Any]:
    """Autocast context for the forward pass, or a no-op when running in fp32."""
    import torch

    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: Any, dtype: Any) -> Any:
    """A GradScaler that is active only for fp16 (bf16 and fp32 need no loss scaling)."""
    import torch

    return torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu",
                                enabled=dtype is not None and dtype == torch.float16)


def seed_all(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) for reproducible runs."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_threads(device: Any) -> None:
    """On GPU the data workers need the cores; on CPU torch may use them all (OMP_NUM_THREADS wins)."""
    import torch

    if device.type == "cuda" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


#: glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD and M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _glibc_function(name: str) -> Any:
    """The C library's function `name` (a ctypes callable), or None where there is none (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Stop glibc from handing large freed blocks back to the OS after every tensor.

    On CPU, each training step allocates and frees activations of hundreds of MB; by default glibc
    serves them with mmap and returns them with munmap, so every step pays millions of page faults.
    Keeping them in the heap made a Hippocampus 3d_fullres step 1.5x faster here (see
    docs/benchmarks.md); the price is that the process keeps its peak memory. Returns False where
    it does not apply (not glibc).
    """
    import ctypes

    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    ok = mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1
    ok = mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1 and ok
    if ok:
        log.debug("glibc keeps freed memory for reuse (fewer page faults)")
    return ok


def return_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS now (glibc malloc_trim), whatever keep_freed_memory set.

    For one-off work whose freed memory the rest of the run will not reuse: the torch export and the
    verification forward that fill the engine cache, after which an engine allocates its own pool.
    Returns False where it does not apply (not glibc) or nothing was returned.
    """
    import ctypes

    malloc_trim = _glibc_function("malloc_trim")
    return malloc_trim is not None and malloc_trim(ctypes.c_size_t(0)) == 1


def peak_memory(device: Any) -> tuple[float, str]:
    """(GiB, kind) of this process's peak memory so far: on CUDA the tensors torch allocated on `device`
    (`cuda_allocated`, what the planner's estimate predicts), elsewhere the resident set (`cpu_rss`,
    which also holds the interpreter, torch and the data loader's buffers)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_allocated"
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "cpu_rss"
