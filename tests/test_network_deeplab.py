"""The `deeplab` and `deeplabv3plus` families: where striding stops and dilation starts (per axis), the ASPP
rates, the image-level branch and its receptive-field convention, v3+'s low-level skip, the output head."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import model_builders
import numpy as np
import pytest
import torch
from model_builders import field_extents
from torch import nn

from autoseg.errors import SettingsError
from autoseg.model.build import build_network
from autoseg.model.contract import Topology
from autoseg.model.deeplab_net import GlobalContext
from autoseg.model.families import NETWORKS
from autoseg.model.networks.deeplab import aspp_rates, atrous_plan, low_level_stage, stage_dilations
from autoseg.training.init import prior_zero_init

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("deeplab", "deeplabv3plus")


def plan(dim: int, strides: tuple[tuple[int, ...], ...], *, name: str = "deeplab",
         kernels: tuple[tuple[int, ...], ...] | None = None, width: int = 2) -> Topology:
    """The planner's stage-plan shape for these strides (features `width` doubling), as family `name`."""
    n = len(strides)
    stage_plan = Topology(dim, tuple(width * 2**i for i in range(n)), kernels or ((3,) * dim,) * n, strides,
                          (2,) * n, (2,) * (n - 1))
    return NETWORKS.get(name).plan_topology(stage_plan)


HIPPOCAMPUS = ((1, 1, 1),) + ((2, 2, 2),) * 3
ACDC = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2))
DEEP_2D = ((1, 1),) + ((2, 2),) * 4


def test_striding_stops_at_output_stride_8_per_axis_and_later_strides_become_dilation() -> None:
    # total stride (4, 32, 32): z keeps all its strides, y and x stop at 8 and dilate stages 4 and 5 by 2 and 4
    topology = plan(3, ACDC)
    strides, _, output = atrous_plan(topology)
    assert output == (4, 8, 8) and topology.total_stride == (4, 32, 32)  # the plan's stride stays the contract
    assert strides[4:] == [(1, 1, 1), (1, 1, 1)]
    assert stage_dilations(topology) == [(1, 1, 1)] * 4 + [(1, 2, 2), (1, 4, 4)]
    network = build_network(topology, in_channels=1, num_classes=2).eval()
    convs = [m for m in network.encoder.stages[5].modules() if isinstance(m, nn.Conv3d) and m.kernel_size[0] > 1]
    assert {(c.dilation, c.padding, c.stride) for c in convs} == {((1, 4, 4), (1, 4, 4), (1, 1, 1))}
    seen = []
    network.aspp.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape[2:])))
    with torch.no_grad():
        assert tuple(network(torch.randn(1, 1, 8, 32, 64)).shape) == (1, 2, 8, 32, 64)
    assert seen == [(2, 4, 8)]  # patch / (4, 8, 8), not / (4, 32, 32)
    # Hippocampus: total stride 8 = the output stride, nothing dilated
    assert stage_dilations(plan(3, HIPPOCAMPUS)) == [(1, 1, 1)] * 4


def test_aspp_rates_keep_1_2_3_and_fit_the_smallest_planned_map() -> None:
    # y/x: deepest map >= 4 x 32 / 8 = 16 voxels -> largest rate 7 (15 taps); z: 4 voxels -> 1
    assert aspp_rates(plan(3, ACDC)) == [(1, 2, 2), (1, 5, 5), (1, 7, 7)]
    # 2D, 8 stages (total 128): map >= 64 at stride 8, close to the paper's (12, 24, 36) for 65
    assert aspp_rates(plan(2, ((1, 1),) + ((2, 2),) * 7)) == [(10, 10), (21, 21), (31, 31)]
    assert aspp_rates(plan(3, HIPPOCAMPUS)) == [(1, 1, 1)] * 3  # a 5 x 7 x 5 map: no room for rates
    # an axis whose deepest kernel is 1 keeps rate 1; the built branches carry the rates
    flat = plan(3, ACDC, kernels=((1, 3, 3),) * 6)
    assert [r[0] for r in aspp_rates(flat)] == [1, 1, 1]
    branches = build_network(flat, in_channels=1, num_classes=2).aspp.branches
    assert [b.conv.dilation for b in branches] == [(1, 1, 1), (1, 2, 2), (1, 5, 5), (1, 7, 7)]
    assert [b.conv.padding for b in branches] == [(0, 0, 0), (0, 2, 2), (0, 5, 5), (0, 7, 7)]


@pytest.mark.parametrize("name", NAMES)
def test_the_image_level_branch_sees_the_whole_input(name: str) -> None:
    """The far corner lies outside the local field (101 voxels around the centre) and yet has a gradient:
    through the global pooling branch, and through nothing else (zero once that branch is detached). Batch
    norm in eval mode: an instance norm would couple all voxels itself."""
    topology = dataclasses.replace(plan(2, ((1, 1), (2, 2), (2, 2)), name=name), norm="batch")
    assert max(NETWORKS.get(name).receptive_field(topology)) < 2 * 56
    network = build_network(topology, in_channels=1, num_classes=1).double().eval()
    assert sum(isinstance(m, GlobalContext) for m in network.modules()) == 1
    corners = []
    for detach in (False, True):
        if detach:
            network.aspp.image.register_forward_hook(lambda _m, _i, out: out.detach())
        x = torch.rand(1, 1, 128, 128, dtype=torch.float64, requires_grad=True)
        network(x)[0, 0, 64, 64].backward()
        corners.append(float(x.grad[0, 0, 0, 0]))
    assert corners[0] != 0 and corners[1] == 0


@pytest.fixture()
def detached_global_context(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """model_builders.field_extents with the outputs of `global_context` modules detached: the change the
    shared receptive-field test needs for families with image-level pooling (module docstring of
    autoseg.model.networks.deeplab)."""
    build = model_builders.build_network

    def detached(*args: object, **kwargs: object) -> nn.Module:
        network = build(*args, **kwargs)
        for module in network.modules():
            if getattr(module, "global_context", False):
                module.register_forward_hook(lambda _m, _i, out: out.detach())
        return network

    monkeypatch.setattr(model_builders, "build_network", detached)
    yield


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("strides", "axis"), [(DEEP_2D, 0), (((1, 1, 1), (1, 2, 2), (2, 2, 2)), 1)],
                         ids=["2d-dilated", "aniso-y"])
def test_formula_equals_the_gradient_field_without_the_global_branch(
        name: str, strides: tuple[tuple[int, ...], ...], axis: int, detached_global_context: None) -> None:
    """The local field (path) equals the measured one, dilated stages and (for v3+) the skip included."""
    topology = plan(len(strides[0]), strides, name=name, width=1)
    field = NETWORKS.get(name).receptive_field(topology)[axis]
    total = topology.total_stride
    size = [2 * t for t in total]
    size[axis] = -(-(field + 4 * total[axis] + 2) // total[axis]) * total[axis]
    extents = field_extents(topology, tuple(size), axis=axis)
    assert sum(extents) / len(extents) == field


def test_v3plus_joins_the_last_stage_at_stride_4_or_finer() -> None:
    assert low_level_stage(plan(3, HIPPOCAMPUS)) == 2  # cumulative 1, 2, 4, 8: stage 2
    assert low_level_stage(plan(2, ((1, 1), (2, 2), (2, 2)))) == 1  # stride 4 is the output stride already
    assert low_level_stage(plan(3, ACDC)) == 2  # (1, 2, 2), (2, 4, 4): stage 2
    topology = plan(3, HIPPOCAMPUS, name="deeplabv3plus", width=8)
    network = build_network(topology, in_channels=1, num_classes=3).eval()
    assert network.decoder.reduce.conv.in_channels == 32 and network.decoder.reduce.conv.out_channels == 12
    with torch.no_grad():
        assert tuple(network(torch.randn(2, 1, 8, 16, 8)).shape) == (2, 3, 8, 16, 8)
    assert NETWORKS.get("deeplabv3plus").receptive_field(topology) > NETWORKS.get("deeplab").receptive_field(
        dataclasses.replace(topology, architecture="deeplab"))


@pytest.mark.parametrize("name", NAMES)
def test_the_classifier_is_the_head_and_interpolation_keeps_the_prior(name: str) -> None:
    network = build_network(plan(2, DEEP_2D, name=name), in_channels=1, num_classes=3).eval()
    assert network.output_heads == [network.classifier]
    prior_zero_init(network, lambda: np.array([0.5, 0.3, 0.2]), False)
    with torch.no_grad():
        probabilities = network(torch.randn(1, 1, 32, 48)).softmax(1)
    assert torch.allclose(probabilities, torch.tensor([0.5, 0.3, 0.2]).view(1, 3, 1, 1), atol=1e-6)


def test_single_output_and_input_checks() -> None:
    network = build_network(plan(2, DEEP_2D), in_channels=1, num_classes=2)
    assert network.deep_supervision is False and not NETWORKS.get("deeplab").deep_supervision
    with pytest.raises(SettingsError, match="single output"):
        network.deep_supervision = True
    with pytest.raises(SettingsError, match="divisible"):
        network(torch.randn(1, 1, 12, 16))  # the network's own stride is 8
    network.eval()
    with torch.no_grad():  # 8 divides 24 though the plan's total stride 16 does not: only the planner needs 16
        assert tuple(network(torch.randn(1, 1, 24, 16)).shape) == (1, 2, 24, 16)
