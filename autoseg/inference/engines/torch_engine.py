"""The torch engine: the network itself, unchanged (the reference every other engine is verified against).

Its precision is torch's own: fp32, or bf16 autocast on CPUs with native bf16 when prediction asks for it
(`PredictOptions.cpu_bf16`, applied around the call by the sliding window), so compiling is a no-op.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from autoseg.inference.engines.base import ENGINES, CompileSpec, Engine


class TorchEngine(Engine):
    name = "torch"
    module = "torch"
    distribution = "torch"
    precisions = ("fp32", "bf16")
    needs_onnx = False
    reference = True

    def compile(self, network: nn.Module, onnx_path: Path | None, spec: CompileSpec,
                workdir: Path | None) -> nn.Module:
        return network


ENGINES.register("torch")(TorchEngine())
