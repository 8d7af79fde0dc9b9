"""nnU-Net v2 checkpoints loaded without unpickling code, and their weights as autoseg's U-Net state_dict.

nnU-Net's trainer saves `network_weights` (the network's state_dict), optimizer and grad-scaler state, its
training log, `init_args` (plans, configuration, fold, dataset.json, device), `trainer_name` and
`inference_allowed_mirroring_axes` with torch.save. They are read with `torch.load(weights_only=True)`,
allowing besides tensors and plain data only what the training log adds: numpy scalars (the scalar
constructor, `numpy.dtype` and the numeric dtype classes). A checkpoint that needs any other global is
refused before anything from it is used. The weights map key by key onto autoseg's U-Net (PlainConvUNet and
ResidualEncoderUNet alike); a key or shape that does not fit means another network than the plans say.
"""

from __future__ import annotations

import operator
import re
from pathlib import Path
from typing import Any

from autoseg.model.contract import Topology
from autoseg.sharing.nnunet_model import NnunetModelError

#: numpy dtype classes of the scalars nnU-Net logs (float32/64 losses and Dice, integer counts).
_DTYPES = ("Float16DType", "Float32DType", "Float64DType", "Int8DType", "Int16DType", "Int32DType", "Int64DType",
           "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType", "BoolDType")


def _numpy_globals() -> list[Any]:
    """What nnU-Net's training log puts into checkpoints besides tensors and plain data: numpy scalars, i.e.
    the scalar constructor (under its numpy 2 and numpy 1 names), numpy.dtype and numeric dtype classes."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    classes = [getattr(np.dtypes, name) for name in _DTYPES if hasattr(getattr(np, "dtypes", None), name)]
    return [np.dtype, *classes, (scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar")]


def load_nnunet_checkpoint(path: Path) -> dict[str, Any]:
    """nnU-Net's checkpoint dict, loaded weights-only; anything beyond tensors, plain data and numpy scalars
    (a pickled object of any other class) is refused with the names of the globals it asks for."""
    import pickle

    import torch

    if not path.is_file():
        raise NnunetModelError("checkpoint not found", path=path, hint="pass -f with folds that were trained")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = re.findall(r"GLOBAL ([\w.]+)", str(err)) or [str(err).splitlines()[0][:200]]
        raise NnunetModelError(f"the checkpoint asks to unpickle {', '.join(names)}, which autoseg never loads "
                               "(only tensors, plain data and numpy scalars are accepted)", path=path,
                               hint="use a checkpoint written by nnU-Net's trainer; re-save its network_weights "
                                    "alone with torch.save if it carries other objects") from err
    except Exception as err:
        raise NnunetModelError(f"checkpoint cannot be loaded ({type(err).__name__}: {str(err)[:200]})", path=path,
                               hint="the file is damaged or not an nnU-Net checkpoint") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("network_weights"), dict):
        raise NnunetModelError("not an nnU-Net checkpoint (no network_weights)", path=path,
                               hint="use fold_k/checkpoint_final.pth of an nnU-Net v2 model folder")
    return payload


def mirror_axes(payload: dict[str, Any], dim: int, path: Path) -> tuple[int, ...]:
    """The checkpoint's `inference_allowed_mirroring_axes`, network axes (0 = z, or y for 2D); None, as the
    NoMirroring trainers store, means no test-time mirroring."""
    axes = payload.get("inference_allowed_mirroring_axes")
    if axes is None:
        return ()
    try:
        values = tuple(operator.index(a) for a in axes)
    except TypeError:
        values = (-1,)
    if any(not 0 <= a < dim for a in values):
        raise NnunetModelError(f"inference_allowed_mirroring_axes {axes!r} are not axes of a {dim}D network",
                               path=path, hint="the checkpoint does not belong to this configuration")
    return tuple(dict.fromkeys(values))


#: nnU-Net state_dict key -> autoseg key; `L` is replaced by the decoder level (n_stages - 2 - k).
_KEY_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.(\w+)", r"encoder.stages.\1.\2.\3.\4"),
    (r"encoder\.stem\.convs\.(\d+)\.(conv|norm)\.(\w+)", r"encoder.stem.\1.\2.\3"),
    (r"encoder\.stages\.(\d+)\.blocks\.(\d+)\.(conv1|conv2)\.(conv|norm)\.(\w+)", r"encoder.stages.\1.\2.\3.\4.\5"),
    (r"encoder\.stages\.(\d+)\.blocks\.(\d+)\.skip\.(\d+)\.(conv|norm)\.(\w+)", r"encoder.stages.\1.\2.skip.\3.\4.\5"),
    (r"decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(\w+)", r"decoder.L\1.convs.\2.\3.\4"),
    (r"decoder\.transpconvs\.(\d+)\.(\w+)", r"decoder.L\1.up.conv.\2"),
    (r"decoder\.seg_layers\.(\d+)\.(\w+)", r"decoder.L\1.head.\2"),
))
#: Copies of the same tensors under a second name (ConvDropoutNormReLU.all_modules, UNetDecoder.encoder).
_ALIASES = re.compile(r"(.*\.all_modules\..*|decoder\.encoder\..*)")
#: Wrappers' prefixes (DDP, torch.compile) that older checkpoints may carry.
_PREFIX = re.compile(r"^(module\.|_orig_mod\.)+")


def autoseg_key(key: str, n_stages: int) -> str | None:
    """autoseg's U-Net key for an nnU-Net PlainConvUNet / ResidualEncoderUNet key; None for an alias."""
    key = _PREFIX.sub("", key)
    if _ALIASES.fullmatch(key):
        return None
    for pattern, replacement in _KEY_RULES:
        if pattern.fullmatch(key):
            mapped = pattern.sub(replacement, key)
            return re.sub(r"decoder\.L(\d+)", lambda m: f"decoder.{n_stages - 2 - int(m.group(1))}", mapped)
    return ""


def map_weights(weights: dict[str, Any], target: dict[str, Any], n_stages: int, path: Path) -> dict[str, Any]:
    """nnU-Net's network_weights as a state_dict for autoseg's U-Net (`target`: its own state_dict).

    Every autoseg tensor must come from exactly one nnU-Net tensor of the same shape, except conv biases
    nnU-Net leaves out (conv_bias False, the ResEnc skip projections), which are zero; every nnU-Net tensor
    must be used. Anything else means another architecture than the plans describe: refused.
    """
    import torch

    _check_aliases(weights, path)
    mapped: dict[str, Any] = {}
    unknown = []
    for key, tensor in weights.items():
        name = autoseg_key(str(key), n_stages)
        if name is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            unknown.append(f"{key} (a {type(tensor).__name__}, not a tensor)")
            continue
        if name not in target or name in mapped or tuple(target[name].shape) != tuple(tensor.shape):
            unknown.append(f"{key} {tuple(tensor.shape)}")
            continue
        mapped[name] = tensor.detach().to(dtype=target[name].dtype)
    for name, tensor in target.items():
        if name not in mapped and name.endswith("conv.bias"):
            mapped[name] = torch.zeros_like(tensor)
    missing = [name for name in target if name not in mapped]
    if unknown or missing:
        detail = "; ".join(filter(None, (f"unmatched {', '.join(unknown[:3])}" if unknown else "",
                                         f"missing {', '.join(missing[:3])}" if missing else "")))
        raise NnunetModelError(f"the checkpoint's network does not match the plans' architecture ({detail})",
                               path=path, hint="the trainer builds another network than its plans say (a custom "
                                               "trainer class?); predict it with nnU-Net itself")
    return mapped


def _check_aliases(weights: dict[str, Any], path: Path) -> None:
    """Each alias must hold its original's values: nnU-Net's load_state_dict would take the alias's (loaded
    last), so a checkpoint whose copies differ would not segment as nnU-Net does with it."""
    import torch

    bare = {_PREFIX.sub("", str(key)): tensor for key, tensor in weights.items()}
    for key, tensor in bare.items():
        if not _ALIASES.fullmatch(key):
            continue
        if key.startswith("decoder.encoder."):
            originals = [key.removeprefix("decoder.")]
        else:
            prefix, _, param = re.sub(r"\.all_modules\.\d+\.", ".", key).rpartition(".")
            originals = [f"{prefix}.conv.{param}", f"{prefix}.norm.{param}"]
        if not any(isinstance(bare.get(o), torch.Tensor) and isinstance(tensor, torch.Tensor)
                   and bare[o].shape == tensor.shape and torch.equal(bare[o], tensor) for o in originals):
            raise NnunetModelError(f"the checkpoint's {key} differs from {' / '.join(originals)}, which nnU-Net "
                                   "stores as the same tensor", path=path,
                                   hint="the checkpoint was edited; use the one nnU-Net's trainer wrote")


def network_state(payload: dict[str, Any], topology: Topology, in_channels: int, num_classes: int,
                  path: Path) -> dict[str, Any]:
    """autoseg's U-Net state_dict for the checkpoint `payload` (loaded from `path`)."""
    from autoseg.model.build import build_network

    network = build_network(topology, in_channels=in_channels, num_classes=num_classes)
    return map_weights(payload["network_weights"], network.state_dict(), topology.n_stages, path)
