"""OpenVINO on the CPU: the ONNX export compiled by OpenVINO's CPU plugin, in fp32 or bf16.

The model is reshaped to a static batch of `tiles` tiles (static shapes let the plugin pick its fastest
kernels; the last, smaller batch of a volume is padded, see CompiledNetwork). The precision is set
explicitly: OpenVINO's default on CPUs with native bf16 (AVX512-BF16, AMX) is bf16, which would change
the output of an fp32 run silently. Compiled blobs are kept in the engine cache (OpenVINO's CACHE_DIR),
so a later process compiles in a fraction of the time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from autoseg.inference.engines.base import ENGINES, CompiledNetwork, CompileSpec, Engine

_PRECISION_HINT = {"fp32": "f32", "bf16": "bf16"}


class OpenVinoEngine(Engine):
    name = "openvino"
    module = "openvino"
    distribution = "openvino"
    extra = "openvino"
    precisions = ("fp32", "bf16")

    def compile(self, network: nn.Module, onnx_path: Path | None, spec: CompileSpec,
                workdir: Path | None) -> nn.Module:
        import openvino

        assert onnx_path is not None
        core = openvino.Core()
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(workdir)})
        model = core.read_model(str(onnx_path))
        model.reshape([spec.tiles, spec.in_channels, *spec.patch])
        config = {"INFERENCE_PRECISION_HINT": _PRECISION_HINT[spec.precision],
                  "INFERENCE_NUM_THREADS": spec.threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        compiled = core.compile_model(model, "CPU", config)
        request = compiled.create_infer_request()

        def run(tiles: np.ndarray) -> np.ndarray:
            request.infer({0: tiles})
            return request.get_output_tensor(0).data  # a view of the request's buffer: the caller copies it

        return CompiledNetwork(run, engine=self.name, precision=spec.precision, static_batch=spec.tiles,
                               release=compiled.release_memory)


ENGINES.register("openvino")(OpenVinoEngine())
