"""The `fcn` family (FCN-8s): which stages are fused, the interpolation init of the learned upsamplings,
the output head the prior init sets, and what the generic family tests do not cover."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from autoseg.errors import SettingsError
from autoseg.model.build import build_network, count_parameters
from autoseg.model.contract import Topology
from autoseg.model.families import NETWORKS
from autoseg.model.fcn_net import LearnedUpsampling, bilinear_kernel
from autoseg.model.networks.fcn import fused_stages, upsampling_factors, upsampling_kernel
from autoseg.training.init import prior_bias, prior_zero_init

pytestmark = pytest.mark.usefixtures("one_thread")

FCN = NETWORKS.get("fcn")


def plan(dim: int, strides: tuple[tuple[int, ...], ...], features: tuple[int, ...] | None = None,
         kernels: tuple[tuple[int, ...], ...] | None = None) -> Topology:
    """The planner's plain U-Net shape for these strides, through the family's topology."""
    n = len(strides)
    stage_plan = Topology(dim, features or tuple(2 * 2**i for i in range(n)), kernels or ((3,) * dim,) * n, strides,
                          (2,) * n, (2,) * (n - 1))
    return FCN.plan_topology(stage_plan)


ANISOTROPIC_4 = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2))


def test_the_last_three_stages_are_fused_with_the_plans_strides_per_axis() -> None:
    topology = plan(3, ANISOTROPIC_4)
    assert fused_stages(topology) == [1, 2, 3]
    # stage 3 -> 2, stage 2 -> 1 by their strides; then stage 1 (cumulative (1, 2, 2)) -> the input
    assert upsampling_factors(topology) == [(2, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert [upsampling_kernel(f) for f in upsampling_factors(topology)] == [(4, 4, 4), (4, 4, 4), (1, 4, 4)]
    network = build_network(topology, in_channels=1, num_classes=3)
    assert len(network.scores) == 3 and [s.in_channels for s in network.scores] == [4, 8, 16]
    assert network.head.conv.kernel_size == (1, 4, 4) and network.head.conv.stride == (1, 2, 2)
    assert topology.convs_per_decoder_stage == (0, 0, 0) and not topology.deep_supervision
    # six stages: only the deepest three have score maps; the final upsampling covers the cumulative stride
    deep = plan(3, ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)))
    assert fused_stages(deep) == [3, 4, 5] and upsampling_factors(deep)[-1] == (4, 8, 8)
    assert upsampling_kernel((4, 8, 8)) == (8, 16, 16)


@pytest.mark.parametrize("strides", [((1, 1), (2, 2)), ((1, 1), (2, 2), (2, 2), (2, 2), (2, 2))],
                         ids=["2-stages", "5-stages"])
def test_2d_outputs_at_the_input_resolution_with_fewer_or_more_stages(strides: tuple[tuple[int, ...], ...]) -> None:
    topology = plan(2, strides)
    network = build_network(topology, in_channels=2, num_classes=4).eval()
    patch = tuple(3 * t for t in topology.total_stride)
    with torch.no_grad():
        assert tuple(network(torch.randn(2, 2, *patch)).shape) == (2, 4, *patch)
    assert len(network.scores) == min(3, len(strides))


@pytest.mark.parametrize(("dim", "factor"), [(2, (2, 2)), (3, (1, 2, 4))])
def test_learned_upsampling_starts_as_linear_interpolation(dim: int, factor: tuple[int, ...]) -> None:
    """Away from the border (one low-resolution voxel), the initialised transposed conv equals
    F.interpolate(linear, align_corners=False) for every class, and it does not mix classes."""
    up = LearnedUpsampling(2, factor, dim=dim, bias=False).double()
    up.interpolation_init()
    x = torch.rand(1, 2, *(6,) * dim, dtype=torch.float64)
    mode = "bilinear" if dim == 2 else "trilinear"
    expected = F.interpolate(x, scale_factor=factor, mode=mode, align_corners=False)
    got = up(x)
    assert got.shape == expected.shape
    inner = (slice(None), slice(None), *(slice(f, -f) if f > 1 else slice(None) for f in factor))
    assert torch.allclose(got[inner], expected[inner])
    weight = up.conv.weight.detach()
    assert weight[0, 1].abs().sum() == 0 and float(weight[0, 0].sum()) == pytest.approx(math.prod(factor))


def test_bilinear_kernel_is_fcns() -> None:
    assert bilinear_kernel((4,)).tolist() == [0.25, 0.75, 0.75, 0.25]
    assert bilinear_kernel((1,)).tolist() == [1.0]
    assert bilinear_kernel((3, 4)).shape == (3, 4) and bilinear_kernel((3,)).tolist() == [0.5, 1.0, 0.5]


def test_the_prior_init_sets_the_final_upsamplings_bias_and_reaches_every_voxel() -> None:
    """output_heads is the final upsampling: its bias is added once per output voxel, so zero head weights
    and the prior bias give exactly the class frequencies everywhere, borders included."""
    network = build_network(plan(3, ANISOTROPIC_4), in_channels=1, num_classes=3).eval()
    assert network.output_heads == [network.head.conv]
    assert [up.conv.bias for up in network.upsampling] == [None, None]
    frequencies = np.array([0.7, 0.2, 0.1])
    prior_zero_init(network, lambda: frequencies, False)
    assert torch.allclose(network.head.conv.bias, torch.from_numpy(prior_bias(frequencies, sigmoid=False)))
    with torch.no_grad():
        probabilities = network(torch.randn(1, 1, 4, 16, 16)).softmax(1)
    assert torch.allclose(probabilities, torch.tensor([0.7, 0.2, 0.1]).view(1, 3, 1, 1, 1), atol=1e-6)


def test_parameters_are_the_encoders_plus_scores_and_upsamplings() -> None:
    topology = plan(3, ANISOTROPIC_4)
    network = build_network(topology, in_channels=1, num_classes=3)
    scores = sum((topology.features_per_stage[s] + 1) * 3 for s in fused_stages(topology))
    ups = sum(math.prod(upsampling_kernel(f)) * 3 * 3 for f in upsampling_factors(topology)) + 3  # + head bias
    assert count_parameters(network) - count_parameters(network.encoder) == scores + ups
    assert FCN.parameters(topology, in_channels=1, num_classes=3) == count_parameters(network)


def test_deep_supervision_stays_off() -> None:
    network = build_network(plan(2, ((1, 1), (2, 2), (2, 2))), in_channels=1, num_classes=2)
    network.deep_supervision = False
    assert network.deep_supervision is False and not FCN.deep_supervision
    with pytest.raises(SettingsError, match="single output"):
        network.deep_supervision = True
    with pytest.raises(SettingsError, match="divisible"):
        network(torch.randn(1, 1, 6, 8))
