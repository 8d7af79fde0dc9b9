"""The `mscadc` family's own properties: the identity-initialised context module passes the front-end's
features through, its rates (1, 1, 2, 4, 8, 16, 1 capped per axis to the smallest planned map), the front-end
that stops striding at output stride 8, the receptive field through the dilated layers, the sizes, the head and
the plans. Shapes, contract, ONNX and training are covered for every family in tests/test_families*.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_builders import field_extents
from test_planning import abdominal_ct, hippocampus
from torch import nn

from autoseg.errors import SettingsError
from autoseg.model.build import build_network, count_parameters
from autoseg.model.contract import Topology
from autoseg.model.families import NETWORKS
from autoseg.model.networks.fcn import upsampling_path
from autoseg.model.networks.mscadc import CONTEXT_RATES, context_rates, frontend_path
from autoseg.model.receptive import Layer
from autoseg.model.receptive import receptive_field as path_field
from autoseg.planning import estimate_memory_gb, plan
from autoseg.training.init import prior_zero_init

MSCADC = NETWORKS.get("mscadc")

pytestmark = pytest.mark.usefixtures("one_thread")

HIPPOCAMPUS = ((1, 1, 1),) + ((2, 2, 2),) * 3
ACDC = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2))
DEEP_2D = ((1, 1),) + ((2, 2),) * 4


def _plan(strides: tuple[tuple[int, ...], ...], *, kernels: tuple[tuple[int, ...], ...] | None = None,
          width: int = 2) -> Topology:
    """The MSCADC topology of the planner's stage-plan shape for these strides (features `width` doubling)."""
    n, dim = len(strides), len(strides[0])
    stage_plan = Topology(dim, tuple(width * 2**i for i in range(n)), kernels or ((3,) * dim,) * n, strides,
                          (2,) * n, (2,) * (n - 1))
    return MSCADC.plan_topology(stage_plan)


def test_the_identity_initialised_module_passes_the_frontends_features_through() -> None:
    """At step 0 every context conv is the identity (centre tap 1 on its own channel) and the ReLU is
    idempotent on the front-end's ReLU output: the module's output equals its input exactly, so the network
    is the front-end, its classifier and the interpolation. Rates > 1 here (2, 3, 3, 3)."""
    torch.manual_seed(0)
    topology = _plan(DEEP_2D)
    assert topology.nonlin == "relu" and [r[0] for r in context_rates(topology)] == [1, 1, 2, 3, 3, 3, 1]
    net = build_network(topology, in_channels=1, num_classes=3)
    assert not any(isinstance(m, nn.LeakyReLU) for m in net.modules())
    for layer in net.context:
        weight = layer.conv.weight.detach()
        assert torch.equal(weight[:, :, 1, 1], torch.eye(32)) and weight.abs().sum() == 32
        assert not layer.conv.bias.any()
    x = torch.randn(2, 1, 32, 48)
    with torch.no_grad():
        features = net.frontend(x)[-1]
        assert features.min() >= 0 and features.max() > 0
        assert torch.equal(net.context(features), features)
        assert torch.equal(net(x), net.up(net.classifier(features)))
    # a trained (here: perturbed) module no longer does
    with torch.no_grad():
        net.context[2].conv.weight.add_(0.01)
        assert not torch.equal(net.context(features), features)


def test_rates_are_the_papers_capped_to_the_smallest_planned_map() -> None:
    # 2D, 8 stages (total 128): the map is at least 4 x 128 / 8 = 64 voxels, every rate fits
    assert context_rates(_plan(((1, 1),) + ((2, 2),) * 7)) == [(r, r) for r in CONTEXT_RATES]
    # y/x: 16 voxels at output stride 8 -> at most 7 (15 taps); z: 4 voxels -> 1
    assert context_rates(_plan(ACDC)) == [(1, 1, 1), (1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 7, 7), (1, 7, 7), (1, 1, 1)]
    assert context_rates(_plan(HIPPOCAMPUS)) == [(1, 1, 1)] * 7  # a 5 x 7 x 5 map: no room for rates
    # a deepest kernel of 1 on an axis: the context kernel is 1 there, its rate 1; the built convs carry both
    flat = _plan(ACDC, kernels=((1, 3, 3),) * 6)
    net = build_network(flat, in_channels=1, num_classes=2)
    assert [(c.conv.kernel_size, c.conv.dilation, c.conv.padding) for c in net.context][3:5] == [
        ((1, 3, 3), (1, 4, 4), (0, 4, 4)), ((1, 3, 3), (1, 7, 7), (0, 7, 7))]


def test_the_front_end_stops_striding_at_output_stride_8() -> None:
    """ACDC's total stride is (4, 32, 32): the context module works on patch / (4, 8, 8), the last two
    stages dilated by 2 and 4 on y and x."""
    topology = _plan(ACDC, width=1)
    assert topology.total_stride == (4, 32, 32) and topology.convs_per_decoder_stage == (0,) * 5
    net = build_network(topology, in_channels=1, num_classes=2).eval()
    convs = [m for m in net.frontend.stages[5].modules() if isinstance(m, nn.Conv3d)]
    assert {(c.stride, c.dilation) for c in convs} == {((1, 1, 1), (1, 4, 4))}
    seen = []
    net.context.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape[2:])))
    with torch.no_grad():
        assert tuple(net(torch.randn(1, 1, 8, 32, 64)).shape) == (1, 2, 8, 32, 64)
    assert seen == [(2, 4, 8)]


def test_the_receptive_field_runs_through_the_dilated_context_layers() -> None:
    """Each context layer adds (a(k - 1) + 1 - 1) x 8 input voxels at output stride 8: 2 x (1 + 1 + 2 + 3 +
    3 + 3 + 1) x 8 = 224 of the field; the gradient (all weights re-initialised positive, which also replaces
    the identity init) reaches exactly as far."""
    topology = _plan(DEEP_2D, width=1)
    field = MSCADC.receptive_field(topology)[0]
    without = frontend_path(topology) + [Layer((1, 1))] + upsampling_path((8, 8))  # the context module left out
    assert field - path_field(without, 2)[0] == 224
    size = (-(-(field + 4 * 16 + 2) // 16) * 16, 32)
    extents = field_extents(topology, size, axis=0)
    assert sum(extents) / len(extents) == field


def test_the_basic_module_has_7_c_squared_k_weights() -> None:
    topology = _plan(HIPPOCAMPUS, width=2)  # C = 16 channels, 3 x 3 x 3 kernels
    net = build_network(topology, in_channels=1, num_classes=3)
    assert count_parameters(net.context) == 7 * (16 * 16 * 27 + 16)
    assert MSCADC.parameters(topology, in_channels=1, num_classes=3) == count_parameters(net)


def test_single_output_head_prior_and_input_checks() -> None:
    net = build_network(_plan(DEEP_2D), in_channels=1, num_classes=3).eval()
    assert net.deep_supervision is False and not MSCADC.deep_supervision and net.output_heads == [net.classifier]
    with pytest.raises(SettingsError, match="single output"):
        net.deep_supervision = True
    with pytest.raises(SettingsError, match="divisible"):
        net(torch.randn(1, 1, 12, 16))  # the network's own stride is 8
    prior_zero_init(net, lambda: np.array([0.5, 0.3, 0.2]), False)
    with torch.no_grad():  # 8 divides 24 though the plan's total stride 16 does not
        probabilities = net(torch.randn(1, 1, 24, 16)).softmax(1)
    assert torch.allclose(probabilities, torch.tensor([0.5, 0.3, 0.2]).view(1, 3, 1, 1), atol=1e-6)


def test_plans_fit_the_budget_with_at_least_the_unets_patch_and_field() -> None:
    for fingerprint in (hippocampus, abdominal_ct):
        unet, mscadc = plan(*fingerprint()), plan(*fingerprint(), network="mscadc")
        for name, config in mscadc.configurations.items():
            other = unet.configurations[name]
            assert config.batch_size >= 2 and not any("memory per voxel" in note for note in config.notes)
            assert np.prod(config.patch_size) >= np.prod(other.patch_size)
            assert config.receptive_field > other.receptive_field
            assert estimate_memory_gb(config.topology, config.patch_size, 2, in_channels=1,
                                      num_classes=mscadc.num_classes) <= 8
