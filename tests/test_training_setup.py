"""Training objects on CUDA's paths that CPU can exercise: the compile fallback and model unwrapping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoseg.runtime.distributed import unwrap_model
from autoseg.training import setup
from autoseg.training.setup import CompiledNetwork


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv3d(2, 2, 1))


def test_a_compile_failure_at_the_first_step_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    def lazy_failure(network: nn.Module):  # torch.compile succeeds; its first call does not
        def call(*args, **kwargs):
            raise RuntimeError("no C compiler found")
        return call

    monkeypatch.setattr(setup.torch, "compile", lazy_failure)
    net = _net()
    wrapped = CompiledNetwork(net)
    x = torch.randn(1, 1, 4, 4, 4)
    with caplog.at_level("WARNING"):
        out = wrapped(x)
    assert torch.equal(out, net(x))
    assert "torch.compile failed at the first step" in caplog.text
    out.sum().backward()  # gradients reach the network's own parameters
    assert all(p.grad is not None for p in net.parameters())


def test_failures_after_a_successful_first_step_are_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def flaky(network: nn.Module):
        def call(*args, **kwargs):
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("CUDA out of memory")
            return network(*args, **kwargs)
        return call

    monkeypatch.setattr(setup.torch, "compile", flaky)
    wrapped = CompiledNetwork(_net())
    wrapped(torch.randn(1, 1, 4, 4, 4))
    with pytest.raises(RuntimeError, match="out of memory"):
        wrapped(torch.randn(1, 1, 4, 4, 4))


def test_checkpoints_of_compiled_networks_have_plain_parameter_names() -> None:
    net = _net()
    plain = list(net.state_dict())
    assert list(unwrap_model(CompiledNetwork(net)).state_dict()) == plain
    assert list(unwrap_model(torch.compile(net)).state_dict()) == plain  # nothing is compiled until called
    assert list(CompiledNetwork(net).state_dict()) == ["module." + k for k in plain]  # listed once
    assert unwrap_model(net) is net
