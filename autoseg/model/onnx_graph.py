"""A torch network as an ONNX graph: `image` (batch, channels, *patch) -> `logits` (batch, classes, *patch),
float32, batch axis dynamic, patch fixed (array order). Shared by the model export of `autoseg export-onnx`
(autoseg.sharing.onnx_export, which adds the sidecar and the onnxruntime check) and the CPU inference engines
(autoseg.inference.engines). torch, onnx and onnxscript are imported lazily.

Exporter: torch's `torch.export`-based ("dynamo") exporter with `dynamic_shapes` where torch has it
(torch >= 2.5; the default since 2.9); the TorchScript exporter (`dynamic_axes`) is the fallback for older
torch or when the dynamo exporter fails; the log says which one was used.
"""

from __future__ import annotations

import importlib
import inspect
import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from autoseg.errors import AutosegError
from autoseg.serialization import atomic_write

if TYPE_CHECKING:
    import onnx
    import torch
    from torch import nn

log = logging.getLogger("autoseg.model")

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
_INSTALL_HINT = 'pip install onnx onnxruntime onnxscript (the onnx extra: pip install -e ".[onnx]" in a checkout)'
#: Loggers that narrate the export (torchvision ops skipped, opset conversion): debug-level noise here.
_EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")


class OnnxExportError(AutosegError):
    """The network cannot be exported to ONNX, or the exported model disagrees with PyTorch."""


class OnnxDependencyError(OnnxExportError):
    """onnx, onnxscript or onnxruntime is not installed."""


def export_network(network: nn.Module, example: torch.Tensor, output: Path, *, opset: int | None = None) -> str:
    """Export an in-memory network (eval mode, deep supervision off, float32 on the CPU) to `output`.

    example: an input (batch >= 2, channels, *patch_size); the batch axis is exported dynamic. The file is
    checked with onnx's checker and written atomically; returns the exporter's name. Used by the inference
    engines (autoseg.inference.engines), which verify the result against PyTorch themselves.
    """
    output = Path(output)
    check_output(output)
    onnx = require("onnx", "to write ONNX models")
    if has_dynamo_exporter():
        require("onnxscript", "by torch's ONNX exporter")
    model, exporter = export_graph(network, example, opset=opset, output=output)
    data = model.SerializeToString()

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        validate(onnx, tmp, output=output)

    atomic_write(output, write)
    return exporter


def check_output(output: Path) -> None:
    """Fail before the slow work for an output that cannot be a file."""
    if output.is_dir():
        raise OnnxExportError("the ONNX output is a folder", path=output,
                              hint=f"give a file name, e.g. {output / 'model.onnx'}")
    existing = next((p for p in output.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OnnxExportError("a parent of the ONNX output is a file, not a folder", path=existing,
                              hint="choose an output path inside a folder")


def require(module: str, why: str, *, extra: str = "") -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise OnnxDependencyError(f"{module} is not installed; it is needed {why}",
                                  hint=f"{_INSTALL_HINT}{extra}") from err


def export_graph(network: nn.Module, example: torch.Tensor, *, opset: int | None,
            output: Path) -> tuple[onnx.ModelProto, str]:
    """The ONNX model of `network` and the name of the exporter that made it.

    The dynamo exporter first (needs onnxscript), the TorchScript one if torch lacks it or it fails.
    """
    failures: list[str] = []
    if has_dynamo_exporter():
        try:
            with _quiet_exporter():
                return _export_dynamo(network, example, opset), "dynamo"
        except Exception as err:  # the exporter raises many kinds; the fallback gets its chance
            failures.append(f"dynamo: {type(err).__name__}: {str(err)[:300]}")
            log.warning("the dynamo ONNX exporter failed (%s: %s); trying the TorchScript exporter",
                        type(err).__name__, str(err)[:300])
    try:
        with _quiet_exporter():
            return _export_torchscript(network, example, opset), "torchscript"
    except Exception as err:
        failures.append(f"torchscript: {type(err).__name__}: {str(err)[:300]}")
        raise OnnxExportError(f"the network cannot be exported to ONNX ({'; '.join(failures)})", path=output,
                              hint="try another opset (e.g. 18), or update torch, onnx and onnxscript") from err


def has_dynamo_exporter() -> bool:
    """torch >= 2.5: `torch.onnx.export(..., dynamo=True, dynamic_shapes=...)`."""
    import torch

    try:
        return "dynamic_shapes" in inspect.signature(torch.onnx.export).parameters
    except (TypeError, ValueError):  # a wrapped export without a signature
        return False


def _export_dynamo(network: nn.Module, example: torch.Tensor, opset: int | None) -> onnx.ModelProto:
    """Capture with torch.export (batch as a symbolic Dim) and translate; weights stay inside the model
    (f=None: no external `.data` file beside it)."""
    import torch

    batch = torch.export.Dim(BATCH_AXIS, min=1)
    program = torch.onnx.export(network, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), opset_version=opset,
                                verbose=False, optimize=True)
    if program is None:  # pragma: no cover - f=None always returns the program
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model_proto


def _export_torchscript(network: nn.Module, example: torch.Tensor, opset: int | None) -> onnx.ModelProto:
    """Trace the network (TorchScript exporter) with `dynamic_axes` for the batch."""
    import onnx
    import torch

    kwargs: dict[str, Any] = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    if opset is not None:
        kwargs["opset_version"] = opset
    buffer = io.BytesIO()
    torch.onnx.export(network, (example,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
                      do_constant_folding=True, **kwargs)
    return onnx.load_model_from_string(buffer.getvalue())


@contextmanager


def _quiet_exporter() -> Iterator[None]:
    """Keep the exporter's chatter (torchvision ops it skips, tracer and deprecation warnings about torch's
    own internals) off the user's terminal: warnings go to autoseg's log at debug level instead."""
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                for warning in caught:
                    log.debug("ONNX exporter: %s: %s", warning.category.__name__, warning.message)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def validate(onnx: ModuleType, path: Path, *, output: Path) -> None:
    """onnx's own checker on the written file: a malformed graph fails here, not in the user's runtime."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as err:  # onnx.checker.ValidationError and protobuf errors
        raise OnnxExportError(f"the exported model is not valid ONNX ({str(err)[:300]})", path=output,
                              hint="try another opset (e.g. 18), or update torch, onnx and onnxscript") from err


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset the model was written with."""
    return next(int(entry.version) for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
