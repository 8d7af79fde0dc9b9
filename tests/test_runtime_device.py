"""Precision choice: --precision auto|fp32|bf16 on every device, and the older flags that map onto it."""

from __future__ import annotations

import pytest
import torch

from autoseg.errors import SettingsError
from autoseg.runtime import device as device_module
from autoseg.runtime.device import PRECISIONS, amp_dtype, precision_dtype

CPU = torch.device("cpu")


def test_cpu_precision_is_fp32_unless_bf16_is_asked_for_or_measured_equivalent(monkeypatch) -> None:
    assert PRECISIONS == ("auto", "fp32", "bf16")
    monkeypatch.delenv(device_module.AUTO_PRECISION_ENV, raising=False)  # conftest holds tests at fp32
    assert precision_dtype(CPU, "fp32") is None and precision_dtype(CPU, "bf16") is torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    # measured equivalent for prediction and for training (issue 16)
    assert precision_dtype(CPU, "auto") is torch.bfloat16
    assert precision_dtype(CPU, "auto", purpose="train") is torch.bfloat16
    # a purpose not measured equivalent stays fp32 (the mechanism, with training switched back off)
    monkeypatch.setitem(device_module.CPU_BF16_BY_DEFAULT, "train", False)
    assert precision_dtype(CPU, "auto", purpose="train") is None and precision_dtype(CPU, "auto") is torch.bfloat16
    assert amp_dtype(CPU) is torch.bfloat16 and amp_dtype(CPU, purpose="train") is None  # the older flags too
    monkeypatch.setenv(device_module.AUTO_PRECISION_ENV, "fp32")
    assert precision_dtype(CPU, "auto") is None  # the environment's choice wins ...
    monkeypatch.setenv(device_module.AUTO_PRECISION_ENV, "bf16")
    assert precision_dtype(CPU, "auto", purpose="train") is torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    assert precision_dtype(CPU, "auto") is None  # ... but bf16 never where it would be emulated
    monkeypatch.setenv(device_module.AUTO_PRECISION_ENV, "fp16")
    with pytest.raises(SettingsError, match="neither fp32 nor bf16"):
        precision_dtype(CPU, "auto")


def test_autoseg_env_says_what_auto_picks_per_purpose(monkeypatch) -> None:
    from autoseg.cli_tables import cpu_auto_precision

    monkeypatch.delenv(device_module.AUTO_PRECISION_ENV, raising=False)
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    assert cpu_auto_precision(True).startswith("bf16 (native, measured equivalent")  # both purposes
    monkeypatch.setitem(device_module.CPU_BF16_BY_DEFAULT, "train", False)
    assert cpu_auto_precision(True).startswith("predict: bf16") and "train: fp32" in cpu_auto_precision(True)
    assert cpu_auto_precision(False).startswith("fp32 (no native bf16")
    monkeypatch.setenv(device_module.AUTO_PRECISION_ENV, "fp32")
    assert cpu_auto_precision(True).startswith("fp32")


def test_unknown_precision_and_the_older_flags() -> None:
    with pytest.raises(SettingsError, match="unknown precision 'fp16'"):
        precision_dtype(CPU, "fp16")
    assert amp_dtype(CPU) is None and amp_dtype(CPU, cpu_bf16=True) is torch.bfloat16
    assert amp_dtype(CPU, enabled=False, cpu_bf16=False) is None
    assert precision_dtype(torch.device("meta"), "bf16") is None  # no autocast where it does not apply


def _resident_bytes() -> int:
    import os

    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_freed_memory_kept_for_reuse_goes_back_to_the_os_when_asked() -> None:
    """keep_freed_memory keeps a freed 256 MiB block resident; return_freed_memory hands it back (the engine
    cache's one-off export and torch reference forward, issue 16)."""
    import ctypes
    import platform

    from autoseg.runtime.device import _glibc_function, keep_freed_memory, return_freed_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    assert keep_freed_memory()
    malloc, free = _glibc_function("malloc"), _glibc_function("free")
    malloc.restype, malloc.argtypes, free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    size = 256 * 2**20
    return_freed_memory()  # free pages left by earlier tests would serve the block without growing the RSS
    before = _resident_bytes()
    block = malloc(size)
    assert block
    ctypes.memset(block, 1, size)
    free(block)
    kept = _resident_bytes()
    assert kept - before > size // 2  # still resident: the heap keeps it for the next allocation
    assert return_freed_memory()
    assert kept - _resident_bytes() > size // 2
