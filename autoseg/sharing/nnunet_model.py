"""nnU-Net v2 plans read without nnunetv2: one configuration of plans.json as autoseg's Plans and Topology.

An nnU-Net v2 model folder (`<Trainer>__<Plans>__<configuration>/`) holds plans.json, dataset.json and
`fold_<k>/checkpoint_{final,best,latest}.pth`. This module turns nnU-Net's plans entry into a Configuration
(spacing, patch, normalisation, resampling) whose Topology builds autoseg's U-Net with nnU-Net's tensors
(`autoseg.sharing.nnunet_weights` maps the checkpoints). Only what autoseg reproduces exactly is accepted:
an unknown network class, normalisation scheme, resampling function, reader or network option stops with
one error naming it and the file. Axis order is nnU-Net's and autoseg's array order (z, y, x) after
`transpose_forward`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autoseg.dataset.contract import Dataset
from autoseg.errors import AutosegError
from autoseg.fingerprint.contract import IntensityStats
from autoseg.model.contract import Topology
from autoseg.planning.contract import Configuration, Plans, Resampling

#: nnU-Net normalisation class -> autoseg scheme computing the same (reference/nnunet-v2.md §5.2).
SCHEMES = {"CTNormalization": "ct", "ZScoreNormalization": "zscore", "RescaleTo01Normalization": "rescale01",
           "RGBTo01Normalization": "rgb01", "NoNormalization": "none"}
#: network_class_name -> Topology.architecture; the arch_kwargs each accepts.
ARCHITECTURES = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": "plain_unet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": "resenc_unet",
}
_COMMON_KWARGS = {"n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage_decoder",
                  "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs", "nonlin",
                  "nonlin_kwargs", "deep_supervision", "nonlin_first"}
_KWARGS = {"plain_unet": _COMMON_KWARGS | {"n_conv_per_stage"},
           "resenc_unet": _COMMON_KWARGS | {"n_blocks_per_stage", "block", "bottleneck_channels", "stem_channels"}}
_NORMS = {"InstanceNorm": "instance", "BatchNorm": "batch"}
_NONLINS = {"torch.nn.LeakyReLU": "leaky_relu", "torch.nn.modules.activation.LeakyReLU": "leaky_relu",
            "torch.nn.ReLU": "relu", "torch.nn.modules.activation.ReLU": "relu"}
#: Readers whose arrays equal autoseg's (SimpleITK's z, y, x order); reorienting or 2D-image readers do not.
READERS = ("SimpleITKIO", "NibabelIO")
RESAMPLING_FUNCTION = "resample_data_or_seg_to_shape"
ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD: autoseg's Resampling default


class NnunetModelError(AutosegError):
    """An nnU-Net model folder cannot be read, or asks for something autoseg does not reproduce exactly."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from an nnU-Net file, with errors that name the file."""
    if not path.is_file():
        raise NnunetModelError(f"no {path.name} in the nnU-Net model folder", path=path.parent,
                               hint="point at the <Trainer>__<Plans>__<configuration> folder nnU-Net trained into")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise NnunetModelError(f"not valid JSON ({err})", path=path, hint="copy the file again") from err
    if not isinstance(data, dict):
        raise NnunetModelError("not a JSON object", path=path, hint="copy the file again")
    return data


def configuration_entry(plans: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    """The plans' configuration `name`, with nnU-Net's `inherits_from` resolved (child keys win)."""
    configurations = plans.get("configurations", {})
    seen: list[str] = []
    entry: dict[str, Any] = {}
    while name is not None:
        if name not in configurations or name in seen:
            raise NnunetModelError(f"configuration {name!r} is not in the plans (or inherits from itself)", path=path,
                                   hint=f"the plans have: {', '.join(configurations) or 'none'}")
        seen.append(name)
        entry = {**configurations[name], **entry}
        name = configurations[name].get("inherits_from")
    entry.pop("inherits_from", None)
    return entry


def convert_plans(plans: dict[str, Any], dataset: Dataset, configuration: str, *, plans_name: str,
                  path: Path) -> Plans:
    """autoseg Plans with the one configuration `configuration` of nnU-Net's plans.json (`path`), checked
    against autoseg's sanity bounds before any network is built from it."""
    from autoseg.planning.sanity import plans_problems

    try:
        converted = _convert(plans, dataset, configuration, plans_name=plans_name, path=path)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise NnunetModelError(f"the plans are incomplete or malformed ({type(err).__name__}: {err})", path=path,
                               hint="use the plans.json nnU-Net wrote into the model folder") from err
    problems = plans_problems(converted)
    if problems:
        raise NnunetModelError(f"the plans ask for values no network can be built from: {'; '.join(problems[:4])}",
                               path=path, hint="use the plans.json nnU-Net wrote into the model folder")
    return converted


def _convert(plans: dict[str, Any], dataset: Dataset, configuration: str, *, plans_name: str, path: Path) -> Plans:
    entry = configuration_entry(plans, configuration, path)
    check_reader({"overwrite_image_reader_writer": plans.get("image_reader_writer")}, path)
    if entry.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
        _refuse(f"preprocessor {entry['preprocessor_name']!r}", path, "autoseg reproduces DefaultPreprocessor only")
    previous = entry.get("previous_stage") or None
    if previous is not None and previous not in plans.get("configurations", {}):
        raise NnunetModelError(f"cascade stage {configuration!r} names a previous stage {previous!r} that is not in "
                               "the plans", path=path, hint="use the plans.json nnU-Net wrote into the model folder")
    channels = len(dataset.channel_names)
    schemes = [_scheme(name, path) for name in entry["normalization_schemes"]]
    if len(schemes) != channels or len(entry["use_mask_for_norm"]) != channels:
        raise NnunetModelError(f"the plans normalise {len(schemes)} channel(s), dataset.json has {channels}",
                               path=path, hint="plans.json and dataset.json come from different datasets")
    topology = topology_from_architecture(entry["architecture"], len(entry["patch_size"]), path)
    config = Configuration(
        name=configuration, spacing=_floats(entry["spacing"]),
        median_shape=_ints(entry["median_image_size_in_voxels"]),
        patch_size=_ints(entry["patch_size"]), batch_size=int(entry["batch_size"]),
        batch_dice=bool(entry.get("batch_dice", False)), normalization=tuple(schemes),
        use_mask_for_norm=tuple(bool(m) for m in entry["use_mask_for_norm"]), resampling=resampling_of(entry, path),
        topology=topology, data_id=str(entry.get("data_identifier", f"{plans_name}_{configuration}")),
        estimated_memory_gb=0.0, previous_stage=None if previous is None else str(previous),
        parameter_count=_parameter_count(topology, channels + (len(dataset.foreground_values) if previous else 0),
                                         dataset.num_classes),
        receptive_field=_receptive_field(topology),
        notes=(f"imported from nnU-Net: {plans.get('plans_name', '?')} {configuration}",),
    )
    return Plans(
        dataset_name=str(plans.get("dataset_name", dataset.name)), plans_name=plans_name,
        fingerprint_hash=f"nnunet:{plans.get('plans_name', '')}", memory_budget_gb=0.0,
        transpose_forward=_ints(plans["transpose_forward"]), transpose_backward=_ints(plans["transpose_backward"]),
        original_median_spacing=_floats(plans["original_median_spacing_after_transp"]),
        original_median_shape=_ints(plans["original_median_shape_after_transp"]),
        channel_names=dataset.channel_names, intensity=_intensity(plans, schemes, path),
        num_classes=dataset.num_classes, configurations={configuration: config},
    )


def check_reader(data: dict[str, Any], path: Path) -> None:
    """dataset.json's `overwrite_image_reader_writer` (or the plans' reader) must read arrays as autoseg does."""
    reader = data.get("overwrite_image_reader_writer")
    if reader is not None and reader not in READERS:
        _refuse(f"image reader {reader!r}", path, f"autoseg reads images like {' or '.join(READERS)} only")


def _scheme(name: str, path: Path) -> str:
    if name not in SCHEMES:
        _refuse(f"normalization scheme {name!r}", path, f"autoseg reproduces {', '.join(SCHEMES)}")
    return SCHEMES[name]


def _intensity(plans: dict[str, Any], schemes: list[str], path: Path) -> tuple[IntensityStats, ...]:
    """Per channel foreground statistics (only CT normalisation uses them; zeros stand in elsewhere)."""
    properties = plans.get("foreground_intensity_properties_per_channel", {})
    fields = ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")
    stats = []
    for channel, scheme in enumerate(schemes):
        values = properties.get(str(channel))
        if values is None and scheme == "ct":
            raise NnunetModelError(f"CTNormalization of channel {channel} needs its foreground intensity properties",
                                   path=path, hint="the plans lack foreground_intensity_properties_per_channel: "
                                                   "copy plans.json from the training machine again")
        stats.append(IntensityStats(*(float((values or {}).get(f, 0.0)) for f in fields)))
    return tuple(stats)


def resampling_of(entry: dict[str, Any], path: Path) -> Resampling:
    """nnU-Net's three resampling functions as autoseg's orders; anything else is refused."""
    orders, order_z = {}, set()
    for kind in ("data", "seg", "probabilities"):
        function, kwargs = entry.get(f"resampling_fn_{kind}"), entry.get(f"resampling_fn_{kind}_kwargs", {})
        if function != RESAMPLING_FUNCTION:
            _refuse(f"resampling function {function!r} ({kind})", path, f"autoseg reproduces {RESAMPLING_FUNCTION}")
        if kwargs.get("force_separate_z") is not None:
            _refuse(f"force_separate_z={kwargs['force_separate_z']} ({kind})", path,
                    "autoseg decides separate-z resampling by the anisotropy rule (force_separate_z None)")
        orders[kind] = int(kwargs.get("order", 3 if kind == "data" else 1))
        order_z.add(int(kwargs.get("order_z", 0)))
    if len(order_z) != 1:
        _refuse(f"different order_z per resampling function ({sorted(order_z)})", path,
                "autoseg uses one order_z for images, labels and probabilities")
    return Resampling(order_image=orders["data"], order_label=orders["seg"],
                      order_probabilities=orders["probabilities"], order_z=order_z.pop(),
                      anisotropy_threshold=ANISOTROPY_THRESHOLD)


def topology_from_architecture(architecture: dict[str, Any], dim: int, path: Path) -> Topology:
    """autoseg's Topology for nnU-Net's `architecture` block (network_class_name + arch_kwargs)."""
    name = architecture.get("network_class_name")
    if name not in ARCHITECTURES:
        known = " and ".join(c.rsplit(".", 1)[1] for c in ARCHITECTURES)
        _refuse(f"network class {name!r}", path, f"autoseg builds {known}")
    key = ARCHITECTURES[name]
    kwargs = dict(architecture.get("arch_kwargs", {}))
    unknown = sorted(set(kwargs) - _KWARGS[key])
    if unknown:
        _refuse(f"arch_kwargs {', '.join(unknown)} of {name.rsplit('.', 1)[1]}", path,
                "autoseg knows the options of nnU-Net's planners only")
    conv = str(kwargs["conv_op"])
    if conv not in (f"torch.nn.modules.conv.Conv{dim}d", f"torch.nn.Conv{dim}d"):
        _refuse(f"conv_op {conv!r} for a {dim}D configuration", path, f"autoseg builds Conv{dim}d networks")
    if kwargs.get("nonlin_first"):
        _refuse("nonlin_first=True", path, "autoseg's blocks are conv-norm-nonlin")
    plain_stem = kwargs.get("stem_channels") in (None, kwargs["features_per_stage"][0])
    if key == "resenc_unet" and (kwargs.get("block", "BasicBlockD") != "BasicBlockD"
                                 or kwargs.get("bottleneck_channels") or not plain_stem):
        _refuse("residual blocks other than BasicBlockD with the default stem", path,
                "autoseg's residual encoder is nnU-Net's ResEnc (BasicBlockD, stem of features_per_stage[0])")
    n = int(kwargs["n_stages"])
    per_stage = kwargs["n_conv_per_stage" if key == "plain_unet" else "n_blocks_per_stage"]
    return Topology(
        dim=dim, features_per_stage=_ints(kwargs["features_per_stage"]),
        kernel_sizes=_nested(kwargs["kernel_sizes"], n, dim), strides=_nested(kwargs["strides"], n, dim),
        convs_per_stage=_per_stage(per_stage, n),
        convs_per_decoder_stage=_per_stage(kwargs["n_conv_per_stage_decoder"], n - 1), architecture=key,
        upsampling="transposed_conv", norm=_norm(kwargs, path), nonlin=_nonlin(kwargs, path), deep_supervision=True,
    )


def _norm(kwargs: dict[str, Any], path: Path) -> str:
    op = str(kwargs.get("norm_op"))
    kind = next((value for prefix, value in _NORMS.items() if op.rsplit(".", 1)[-1].startswith(prefix)), None)
    options = kwargs.get("norm_op_kwargs") or {}
    if kind is None or float(options.get("eps", 1e-5)) != 1e-5 or not options.get("affine", True):
        _refuse(f"norm_op {op!r} with {options}", path, "autoseg's norms are instance or batch norm, eps 1e-5, affine")
    return kind


def _nonlin(kwargs: dict[str, Any], path: Path) -> str:
    op, options = str(kwargs.get("nonlin")), kwargs.get("nonlin_kwargs") or {}
    slope = float(options.get("negative_slope", 1e-2))
    if op not in _NONLINS or (_NONLINS[op] == "leaky_relu" and slope != 1e-2):
        _refuse(f"nonlin {op!r} with {options}", path, "autoseg builds LeakyReLU(0.01) and ReLU")
    return _NONLINS[op]


def _per_stage(value: Any, n: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),) * n


def _nested(value: Any, n: int, dim: int) -> tuple[tuple[int, ...], ...]:
    rows = value if isinstance(value, list) else [value] * n
    return tuple(tuple(int(v) for v in row) if isinstance(row, list) else (int(row),) * dim for row in rows)


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(round(float(v))) for v in values)


def _floats(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _parameter_count(topology: Topology, in_channels: int, num_classes: int) -> int:
    from autoseg.model.families import family_of

    return family_of(topology).parameters(topology, in_channels=in_channels, num_classes=num_classes)


def _receptive_field(topology: Topology) -> tuple[int, ...]:
    from autoseg.model.families import family_of

    return family_of(topology).receptive_field(topology)


def _refuse(what: str, path: Path, why: str) -> None:
    raise NnunetModelError(f"{what} cannot be reproduced by autoseg ({why})", path=path,
                           hint="predict this model with nnU-Net itself; autoseg refuses rather than segment "
                                "differently")
