"""ONNX export of one fold's trained network, with a JSON sidecar saying how to feed it.

The ONNX model covers the network only: one patch in, full-resolution logits out,
`image` (batch, channels, *patch_size) -> `logits` (batch, num_classes, *patch_size), float32, the batch
axis dynamic and the patch fixed (z, y, x in 3D, y, x in 2D, array order after the plan's transpose).
Everything around the network stays in autoseg: cropping, resampling to the configuration's spacing,
intensity normalisation, the sliding window with its Gaussian weighting and mirroring, softmax/sigmoid,
and the export back to the input's geometry. An ONNX graph alone cannot be used correctly without
knowing that preprocessing, so `<name>.onnx.json` next to the model records it (`OnnxSidecar`).

Exporter: torch's `torch.export`-based ("dynamo") exporter with `dynamic_shapes` where torch has it
(torch >= 2.5; the default since 2.9): it handles InstanceNorm, transposed convs, nearest upsampling and
the pixel shuffle of every autoseg U-Net without tracer warnings. The TorchScript exporter (`dynamic_axes`)
is the fallback for older torch or when the dynamo exporter fails; the log says which one was used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from autoseg.dataset.load import read_dataset_json
from autoseg.errors import SettingsError
from autoseg.fingerprint.contract import IntensityStats
from autoseg.model.onnx_graph import (
    BATCH_AXIS,
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxExportError,
)
from autoseg.model.onnx_graph import OnnxDependencyError as OnnxDependencyError  # re-exported: the API's errors
from autoseg.model.onnx_graph import check_output as _check_output
from autoseg.model.onnx_graph import export_graph as _export
from autoseg.model.onnx_graph import has_dynamo_exporter as _has_dynamo_exporter
from autoseg.model.onnx_graph import opset_of as _opset_of
from autoseg.model.onnx_graph import require as _require
from autoseg.model.onnx_graph import validate as _validate
from autoseg.model_folder import (
    CHECKPOINT_NAMES,
    ModelFolder,
    PreviousStage,
    network_in_channels,
    previous_stage,
)
from autoseg.planning.contract import Resampling
from autoseg.serialization import atomic_write, load_contract, save_contract

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("autoseg.sharing")

ONNX_SIDECAR_FORMAT = 1
#: Batch size of the example input the graph is captured with, and of the check's random input.
_EXAMPLE_BATCH = 2
#: The check's tolerance on max |onnx - torch|, relative to the largest logit magnitude (at least 1).
_RELATIVE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class OnnxSidecar:
    """What a consumer of the ONNX model needs besides the graph (written as `<model>.onnx.json`).

    Axis order of patch_size, spacing (mm) and mirror_axes (spatial axes, 0 = first after channels):
    the array order after `transpose_forward` is applied to the file's (z, y, x). Input channels are
    the image channels in `channel_names` order, each normalised with `normalization[i]` (and
    `intensity[i]` for CT), then for a cascade stage one one-hot channel per `previous_stage.values`.
    Output channel i is label value i after a softmax (`activation` "softmax"), or region i written as
    `region_values[i]` where its sigmoid exceeds 0.5 (`activation` "sigmoid").
    """

    model_file: str
    configuration: str
    fold: str
    checkpoint: str
    input_name: str
    input_shape: tuple[int | str, ...]
    output_name: str
    output_shape: tuple[int | str, ...]
    patch_size: tuple[int, ...]
    spacing: tuple[float, ...]
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    channel_names: tuple[str, ...]
    normalization: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    intensity: tuple[IntensityStats, ...]
    resampling: Resampling
    labels: dict[str, tuple[int, ...]]
    ignore_label: int | None
    regions_class_order: tuple[int, ...] | None
    activation: str
    region_values: tuple[int, ...] | None
    num_classes: int
    previous_stage: PreviousStage | None
    mirror_axes: tuple[int, ...]
    opset: int
    exporter: str
    autoseg_version: str
    format: int = ONNX_SIDECAR_FORMAT


@dataclass(frozen=True)
class OnnxExport:
    """What `export_onnx` wrote: the model, its sidecar, the graph's interface and the check's result.

    input_shape is (BATCH_AXIS, channels, *patch_size): the batch axis is dynamic. max_abs_diff is the
    largest |onnx - torch| logit difference on a random batch of 2, or None when the check was skipped.
    """

    path: Path
    sidecar: Path
    input_name: str
    input_shape: tuple[int | str, ...]
    output_name: str
    output_shape: tuple[int | str, ...]
    patch_size: tuple[int, ...]
    num_classes: int
    configuration: str
    fold: str
    checkpoint: str
    opset: int
    exporter: str
    max_abs_diff: float | None


def sidecar_path(output: Path) -> Path:
    """`model.onnx` -> `model.onnx.json`: the suffix is appended so the pair sorts and travels together."""
    return output.with_name(output.name + ".json")


def read_onnx_sidecar(path: str | Path) -> OnnxSidecar:
    """Load a sidecar written by `export_onnx` (format-checked)."""
    return load_contract(path, OnnxSidecar, rerun="autoseg export-onnx (export the model again)")


def export_onnx(model_folder: Path, output: Path, *, fold: str = "0", checkpoint: str = "final",
                opset: int | None = None, check: bool = True) -> OnnxExport:
    """Export the network of one fold of a model folder to `output` (an .onnx file) plus its sidecar.

    The model covers the network only (see the module docstring): (batch, channels, *patch_size) float32
    -> full-resolution logits (batch, num_classes, *patch_size), deep supervision off, batch dynamic.
    opset: the ONNX opset to target (None: torch's recommended one; the one written is in the result).
    check: run the model with onnxruntime on a random batch of 2 and compare it with PyTorch; a
    mismatch raises OnnxExportError and leaves no file behind. Both files are written atomically.
    Raises CheckpointError for a missing plan, fold or checkpoint, OnnxDependencyError without onnx,
    onnxscript or (with check) onnxruntime.
    """
    model_folder, output, fold = Path(model_folder), Path(output), str(fold)
    _check_output(output)
    if checkpoint not in CHECKPOINT_NAMES:
        raise SettingsError(f"unknown checkpoint {checkpoint!r}", hint=f"use one of {', '.join(CHECKPOINT_NAMES)}")
    onnx = _require("onnx", "to write ONNX models")
    runtime = _require("onnxruntime", "to check the exported model", extra=" (or skip the check)") if check else None
    if _has_dynamo_exporter():
        _require("onnxscript", "by torch's ONNX exporter")
    import torch

    from autoseg.inference.export import LabelSemantics
    from autoseg.inference.predictor import configuration_name, load_fold_network

    folder = ModelFolder(model_folder)
    plans = folder.load_plans()
    config = plans.configurations[configuration_name(folder, plans)]
    dataset = read_dataset_json(folder.dataset_file)
    network, mirror_axes = load_fold_network(folder, fold, checkpoint, plans, config, dataset)
    network = network.float().cpu().eval()
    in_channels = network_in_channels(plans, config, dataset)
    patch = tuple(int(p) for p in config.patch_size)
    example = torch.randn(_EXAMPLE_BATCH, in_channels, *patch, generator=torch.Generator().manual_seed(0))

    model, exporter = _export(network, example, opset=opset, output=output)
    written = _opset_of(model)
    if opset is not None and written != opset:
        log.warning("asked for ONNX opset %d, the %s exporter wrote opset %d", opset, exporter, written)
    data = model.SerializeToString()
    difference: list[float] = []

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        _validate(onnx, tmp, output=output)
        if runtime is not None:
            difference.append(_compare(tmp, network, example, runtime, output=output))

    atomic_write(output, write)
    semantics = LabelSemantics.from_dataset(dataset)
    input_shape: tuple[int | str, ...] = (BATCH_AXIS, in_channels, *patch)
    output_shape: tuple[int | str, ...] = (BATCH_AXIS, plans.num_classes, *patch)
    sidecar = OnnxSidecar(
        model_file=output.name, configuration=config.name, fold=fold, checkpoint=checkpoint,
        input_name=INPUT_NAME, input_shape=input_shape, output_name=OUTPUT_NAME, output_shape=output_shape,
        patch_size=patch, spacing=tuple(config.spacing), transpose_forward=tuple(plans.transpose_forward),
        transpose_backward=tuple(plans.transpose_backward), channel_names=tuple(plans.channel_names),
        normalization=tuple(config.normalization), use_mask_for_norm=tuple(config.use_mask_for_norm),
        intensity=tuple(plans.intensity), resampling=config.resampling,
        labels={label.name: label.values for label in dataset.labels}, ignore_label=dataset.ignore_label,
        regions_class_order=dataset.regions_class_order,
        activation="sigmoid" if semantics.is_regions else "softmax", region_values=semantics.region_values,
        num_classes=plans.num_classes, previous_stage=previous_stage(config, dataset),
        mirror_axes=tuple(int(a) for a in mirror_axes), opset=written, exporter=exporter,
        autoseg_version=_autoseg_version(),
    )
    save_contract(sidecar_path(output), sidecar)
    max_abs_diff = difference[0] if difference else None
    log.info("exported %s fold %s (checkpoint_%s) to %s with the %s exporter, opset %d; %s", config.name, fold,
             checkpoint, output, exporter, written,
             "not checked" if max_abs_diff is None else f"max |onnxruntime - torch| = {max_abs_diff:.2e}")
    return OnnxExport(path=output, sidecar=sidecar_path(output), input_name=INPUT_NAME, input_shape=input_shape,
                      output_name=OUTPUT_NAME, output_shape=output_shape, patch_size=patch,
                      num_classes=plans.num_classes, configuration=config.name, fold=fold, checkpoint=checkpoint,
                      opset=written, exporter=exporter, max_abs_diff=max_abs_diff)


def _compare(path: Path, network: nn.Module, example: torch.Tensor, runtime: ModuleType, *, output: Path) -> float:
    """Max |onnxruntime - torch| on `example`; raises OnnxExportError beyond the relative tolerance."""
    import numpy as np
    import torch

    with torch.no_grad():
        expected = network(example).numpy()
    options = runtime.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime's graph-optimisation notes are noise here
    session = runtime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {INPUT_NAME: example.numpy()})
    if len(outputs) != 1 or outputs[0].shape != expected.shape:
        raise OnnxExportError(f"the ONNX model returns {[o.shape for o in outputs]}, PyTorch {expected.shape}",
                              path=output, hint="report this with the model folder's plans.json")
    difference = float(np.abs(outputs[0] - expected).max())
    tolerance = _RELATIVE_TOLERANCE * max(1.0, float(np.abs(expected).max()))
    if not difference <= tolerance:  # NaN fails too
        raise OnnxExportError(f"the ONNX model's logits differ from PyTorch's by up to {difference:.3g} "
                              f"(tolerance {tolerance:.3g}); nothing was written", path=output,
                              hint="try another opset (e.g. 18), update onnxruntime, or pass check=False to "
                                   "keep the model anyway")
    return difference


def _autoseg_version() -> str:
    from autoseg import __version__

    return __version__
