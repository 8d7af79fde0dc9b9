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
    assert precision_dtype(CPU, "auto") is None and precision_dtype(CPU, "fp32") is None
    assert precision_dtype(CPU, "bf16") is torch.bfloat16
    monkeypatch.setattr(device_module, "CPU_BF16_BY_DEFAULT", True)  # once measured (issue 16) ...
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    assert precision_dtype(CPU, "auto") is torch.bfloat16  # ... auto takes bf16 where it is native
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    assert precision_dtype(CPU, "auto") is None  # and never where it would be emulated


def test_unknown_precision_and_the_older_flags() -> None:
    with pytest.raises(SettingsError, match="unknown precision 'fp16'"):
        precision_dtype(CPU, "fp16")
    assert amp_dtype(CPU) is None and amp_dtype(CPU, cpu_bf16=True) is torch.bfloat16
    assert amp_dtype(CPU, enabled=False, cpu_bf16=False) is None
    assert precision_dtype(torch.device("meta"), "bf16") is None  # no autocast where it does not apply
