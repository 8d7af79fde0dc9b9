"""The network-family registry: lookups, the generic size estimator, the receptive field formula, plans
identifiers and what the planner makes of each family."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_builders import field_extents
from test_planning import abdominal_ct, hippocampus

from autoseg.errors import SettingsError
from autoseg.model import Topology, feature_map_elements, parameter_count, receptive_field
from autoseg.model.build import build_network, count_parameters
from autoseg.model.families import NETWORKS, family_of
from autoseg.model.measure import measure
from autoseg.model.receptive import Layer, effective_kernel
from autoseg.model.receptive import receptive_field as path_field
from autoseg.planning import Plans, estimate_memory_gb, plan, summarize
from autoseg.planning.identifier import plan_flags, plans_file_name, plans_identifier, resolve_identifier
from autoseg.preprocessing.previous import previous_dir, previous_file
from autoseg.serialization import load_contract, to_jsonable

FAMILIES = sorted(NETWORKS)
UPSAMPLING = ("transposed_conv", "interp_conv", "pixel_shuffle")
OLD_PLANS = Path(__file__).parent / "data" / "plans_before_network_families.json"


def stage_plan(dim: int, strides: tuple[tuple[int, ...], ...], kernels: tuple[tuple[int, ...], ...],
               features: tuple[int, ...] | None = None) -> Topology:
    """The planner's plain U-Net for these strides and kernels (what every family starts from)."""
    n = len(strides)
    return Topology(dim, features or tuple(min(320, 32 * 2**i) for i in range(n)), kernels, strides, (2,) * n,
                    (2,) * (n - 1))


PLANS_2D = stage_plan(2, ((1, 1), (2, 2), (2, 2)), ((3, 3),) * 3, (1, 1, 1))
ANISOTROPIC = stage_plan(3, ((1, 1, 1), (1, 2, 2), (2, 2, 2)), ((1, 3, 3), (3, 3, 3), (3, 3, 3)), (1, 1, 1))
HIPPOCAMPUS = stage_plan(3, ((1, 1, 1),) + ((2, 2, 2),) * 3, ((3, 3, 3),) * 4)
ACDC = stage_plan(3, ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2)),
                  ((1, 3, 3),) + ((3, 3, 3),) * 5)
WIDE_2D = stage_plan(2, ((1, 1),) + ((2, 2),) * 5, ((3, 3),) * 6)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the registry ------------------------------------------------------------------------------


def test_each_family_says_what_it_is_and_how_it_is_stored() -> None:
    assert {"unet", "resenc"} <= set(FAMILIES)
    for name in FAMILIES:
        family = NETWORKS.get(name)
        assert family.name == name and len(family.description) > 20
        topology = family.plan_topology(HIPPOCAMPUS)
        assert family_of(topology) is family and topology.architecture == family.key
        assert topology.deep_supervision == family.deep_supervision
    # the keys plans stored before the registry keep building the same networks
    assert family_of(HIPPOCAMPUS).name == "unet" and NETWORKS.get("unet").plan_topology(HIPPOCAMPUS) == HIPPOCAMPUS
    resenc = NETWORKS.get("resenc").plan_topology(ACDC)
    assert resenc.architecture == "resenc_unet" and resenc.convs_per_stage == (1, 3, 4, 6, 6, 6)
    assert resenc.convs_per_decoder_stage == (1,) * 5 and resenc.features_per_stage == ACDC.features_per_stage


def test_unknown_names_suggest_the_right_one() -> None:
    with pytest.raises(SettingsError, match="network") as info:
        NETWORKS.get("resnc")
    assert "did you mean 'resenc'" in info.value.hint
    with pytest.raises(SettingsError, match="architecture") as info:
        family_of(dataclasses.replace(HIPPOCAMPUS, architecture="plain_unt"))
    assert "did you mean 'plain_unet'" in info.value.hint
    with pytest.raises(SettingsError, match="upsampling"):
        NETWORKS.get("unet").plan_topology(HIPPOCAMPUS, "pixelshuffle")


def test_listing_families_and_planning_the_unet_do_not_import_torch() -> None:
    code = ("import sys; from autoseg.model.families import NETWORKS; names = list(NETWORKS);"
            "from autoseg.model.contract import Topology;"
            "t = Topology(2, (4, 8), ((3, 3),) * 2, ((1, 1), (2, 2)), (2, 2), (2,));"
            "u = NETWORKS.get('unet'); u.parameters(t, in_channels=1, num_classes=2);"
            "u.elements(t, (8, 8), in_channels=1, num_classes=2); u.receptive_field(t);"
            "print(len(names) >= 2, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "False"]


def test_plans_identifiers_name_the_plans_files() -> None:
    assert plans_identifier("unet") == plans_identifier("UNet", "transposed_conv") == "autoseg"
    assert plans_identifier("resenc") == "resenc" and plans_identifier("unet", "interp_conv") == "unet_interp_conv"
    assert plans_identifier("resenc", "pixel_shuffle") == "resenc_pixel_shuffle"
    assert plans_file_name("autoseg") == plans_file_name("unet") == "plans.json"
    assert plans_file_name("resenc") == "plans__resenc.json"
    assert resolve_identifier(None) == resolve_identifier("unet") == "autoseg"
    assert plan_flags("resenc_pixel_shuffle") == "--network resenc --upsampling pixel_shuffle" and not plan_flags(None)
    with pytest.raises(SettingsError):
        resolve_identifier("../elsewhere")


# ---- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("upsampling", UPSAMPLING)
@pytest.mark.parametrize(("topology", "patch"), [(HIPPOCAMPUS, (40, 56, 40)), (ACDC, (20, 256, 224)),
                                                 (WIDE_2D, (384, 256)), (ANISOTROPIC, (6, 12, 20))],
                         ids=["hippocampus", "acdc", "2d", "anisotropic"])
def test_generic_estimator_equals_the_unet_formulas(topology: Topology, patch: tuple[int, ...],
                                                    upsampling: str) -> None:
    """Measured on the meta device, the U-Net has exactly the calibrated formulas' sizes (docs/networks.md)."""
    topology = dataclasses.replace(topology, upsampling=upsampling)
    parameters, elements = measure(NETWORKS.get("unet"), topology, patch, 2, 4)
    assert parameters == parameter_count(topology, in_channels=2, num_classes=4)
    assert elements == feature_map_elements(topology, patch, in_channels=2, num_classes=4)


@pytest.mark.parametrize("name", FAMILIES)
def test_measured_parameters_equal_the_modules(name: str) -> None:
    family = NETWORKS.get(name)
    topology = family.plan_topology(dataclasses.replace(ANISOTROPIC, features_per_stage=(4, 8, 16)))
    network = build_network(topology, in_channels=2, num_classes=3)
    assert family.parameters(topology, in_channels=2, num_classes=3) == count_parameters(network)
    assert measure(family, topology, None, 2, 3)[0] == count_parameters(network)
    with pytest.raises(SettingsError, match="total stride"):
        measure(family, topology, (5, 12, 20), 2, 3)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_odd_anisotropic_patch_gives_the_right_output_shapes(name: str, deep_supervision: bool) -> None:
    """Total stride (2, 4, 4); patch 6 x 28 x 20: odd multiples along every axis."""
    family = NETWORKS.get(name)
    topology = family.plan_topology(dataclasses.replace(ANISOTROPIC, features_per_stage=(2, 4, 8)))
    network = build_network(topology, in_channels=1, num_classes=3).eval()
    network.deep_supervision = deep_supervision and family.deep_supervision
    with torch.no_grad():
        out = network(torch.randn(2, 1, 6, 28, 20))
    outputs = out if isinstance(out, list) else [out]
    assert tuple(outputs[0].shape) == (2, 3, 6, 28, 20)
    if network.deep_supervision:  # one group of maps per supervised network or path (W-Net: two)
        shapes = [tuple(o.shape[2:]) for o in outputs]
        assert len(shapes) % 2 == 0 and shapes == [(6, 28, 20), (6, 14, 10)] * (len(shapes) // 2)


@pytest.mark.parametrize("name", FAMILIES)
def test_2d_networks_give_the_right_output_shapes(name: str) -> None:
    """2D, total stride (4, 4), patch 12 x 20 (odd multiples), deep supervision on where the family has it."""
    family = NETWORKS.get(name)
    topology = family.plan_topology(dataclasses.replace(PLANS_2D, features_per_stage=(2, 4, 8)))
    network = build_network(topology, in_channels=2, num_classes=3).eval()
    network.deep_supervision = family.deep_supervision
    with torch.no_grad():
        out = network(torch.randn(2, 2, 12, 20))
    outputs = out if isinstance(out, list) else [out]
    assert tuple(outputs[0].shape) == (2, 3, 12, 20)
    expected = [(12, 20), (6, 10)] if family.deep_supervision else [(12, 20)]
    shapes = [tuple(o.shape[2:]) for o in outputs]
    assert shapes and shapes == expected * (len(shapes) // len(expected))


# ---- receptive field ---------------------------------------------------------------------------


def test_receptive_field_formula_with_dilation_by_hand() -> None:
    assert [effective_kernel(3, a) for a in (1, 2, 4)] == [3, 5, 9]
    # 3x3, then 3x3 at rate 2 (5 taps), stride 2, then 3x3 at jump 2: 1 + 2 + 4 + 4 = 11
    layers = [Layer((3, 3)), Layer((3, 3), stride=(2, 1), dilation=(2, 2)), Layer((3, 3))]
    assert path_field(layers, 2) == (11, 9)
    # an upsampling with kernel = stride divides the jump and adds nothing
    assert path_field([Layer((3,), stride=(2,)), Layer((3,), upsample=(2,))], 1) == (5,)


@pytest.mark.parametrize("topology", [HIPPOCAMPUS, ACDC, WIDE_2D, ANISOTROPIC, PLANS_2D])
def test_unet_path_gives_the_closed_form_field(topology: Topology) -> None:
    assert NETWORKS.get("unet").receptive_field(topology) == receptive_field(topology)


def _field_extents(topology: Topology, axis: int) -> tuple[list[int], int]:
    """The gradient-measured extents over one stride period (model_builders.field_extents) on an input
    large enough for the formula's field along `axis`, and that field."""
    field = family_of(topology).receptive_field(topology)[axis]
    total = topology.total_stride
    size = [2 * t for t in total]
    size[axis] = -(-(field + 4 * total[axis] + 2) // total[axis]) * total[axis]
    return field_extents(topology, tuple(size), axis=axis), field


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(("topology", "axis"), [(PLANS_2D, 0), (ANISOTROPIC, 0), (ANISOTROPIC, 1)],
                         ids=["2d", "aniso-z", "aniso-y"])
def test_formula_receptive_field_equals_the_gradient_field(name: str, topology: Topology, axis: int) -> None:
    """The mean over one stride period of the measured field (it depends on the position modulo the total
    stride in a U-Net) equals the lecture's formula, for every registered family."""
    extents, field = _field_extents(NETWORKS.get(name).plan_topology(topology), axis)
    assert sum(extents) / len(extents) == field


# ---- planning ----------------------------------------------------------------------------------


def test_plans_stored_before_families_load_and_replanning_gives_them_again() -> None:
    old = load_contract(OLD_PLANS, Plans, rerun="autoseg plan")
    assert {c.topology.architecture for c in old.configurations.values()} == {"plain_unet"}
    assert plan(*abdominal_ct()) == plan(*abdominal_ct(), network="unet") == old
    small = dataclasses.replace(old.configurations["3d_fullres"].topology, features_per_stage=(2,) * 6)
    assert family_of(small).name == "unet" and count_parameters(build_network(small, in_channels=1, num_classes=3))


def test_resenc_plans_are_sized_for_the_family_and_share_the_unets_data() -> None:
    unet, resenc = plan(*abdominal_ct()), plan(*abdominal_ct(), network="resenc")
    assert resenc.plans_name == "resenc" and list(resenc.configurations) == list(unet.configurations)
    sizes = {"in_channels": 1, "num_classes": resenc.num_classes}
    for name, config in resenc.configurations.items():
        assert family_of(config.topology).name == "resenc"
        assert config.batch_size >= 2 and estimate_memory_gb(config.topology, config.patch_size, 2, **sizes) <= 8
        assert config.receptive_field > unet.configurations[name].receptive_field
        assert config.parameter_count > unet.configurations[name].parameter_count
        assert config.spacing == pytest.approx(unet.configurations[name].spacing) or name == "3d_lowres"
    data = {name: config.data_id for name, config in resenc.configurations.items()}
    assert data == {"2d": "autoseg_2d", "3d_fullres": "autoseg_3d_fullres", "3d_lowres": "resenc_3d_lowres",
                    "3d_cascade_fullres": "autoseg_3d_fullres"}
    assert unet.configurations["3d_lowres"].data_id == "autoseg_3d_lowres"
    assert [row["network"] for row in summarize(resenc)] == ["resenc"] * 4
    assert {row["network"] for row in summarize(unet)} == {"unet"}


def test_cascades_of_two_identifiers_share_the_cache_but_not_the_previous_stage(tmp_path: Path) -> None:
    cache = tmp_path / "autoseg_3d_fullres"
    default = previous_dir(cache, "3d_lowres")
    assert default == previous_dir(cache, "3d_lowres", "autoseg") == cache / "previous_3d_lowres"
    assert previous_file(cache, "3d_lowres", "c1", "resenc") == cache / "previous_3d_lowres__resenc" / "c1.npy"


def test_upsampling_changes_the_identifier_and_the_sizes() -> None:
    default, shuffle = plan(*hippocampus()), plan(*hippocampus(), network="unet", upsampling="pixel_shuffle")
    assert shuffle.plans_name == "unet_pixel_shuffle"
    full, other = default.configurations["3d_fullres"], shuffle.configurations["3d_fullres"]
    assert other.topology.upsampling == "pixel_shuffle" and other.parameter_count > full.parameter_count
    assert other.data_id == full.data_id and summarize(shuffle)[-1]["network"] == "unet (pixel_shuffle)"
    assert to_jsonable(dataclasses.replace(other.topology, upsampling="transposed_conv")) == to_jsonable(full.topology)
