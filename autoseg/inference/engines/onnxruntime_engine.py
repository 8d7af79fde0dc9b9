"""ONNX Runtime on the CPU: the ONNX export run by onnxruntime's CPU execution provider, fp32 only.

The batch axis stays dynamic, so the last, smaller batch of a volume needs no padding. Measured on
2 cores (docs/inference.md): slower than torch on a Hippocampus network, faster on a large CT one, so
`auto` does not pick it; ask for it by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from autoseg.inference.engines.base import ENGINES, CompiledNetwork, CompileSpec, Engine


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"
    module = "onnxruntime"
    distribution = "onnxruntime"
    extra = "onnx"
    precisions = ("fp32",)

    def compile(self, network: nn.Module, onnx_path: Path | None, spec: CompileSpec,
                workdir: Path | None) -> nn.Module:
        import onnxruntime

        assert onnx_path is not None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = spec.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run(tiles: np.ndarray) -> np.ndarray:
            return session.run(None, {input_name: tiles})[0]

        return CompiledNetwork(run, engine=self.name, precision=spec.precision)


ENGINES.register("onnxruntime")(OnnxRuntimeEngine())
