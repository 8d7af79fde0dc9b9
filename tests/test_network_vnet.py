"""The `vnet` family's own properties: 5x5x5 kernels where the plan is isotropic, the original's conv counts,
residual stages, PReLU, kernel = stride down/up convs, 2D outputs and the sizes the planner gives it.
Shapes, contract, receptive field, ONNX and training are covered for every family in tests/test_families*.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_families import ACDC, ANISOTROPIC, HIPPOCAMPUS, PLANS_2D, stage_plan
from test_planning import abdominal_ct, hippocampus
from torch import nn

from autoseg.model.build import build_network
from autoseg.model.families import NETWORKS
from autoseg.model.networks.vnet import is_isotropic, vnet_kernel
from autoseg.planning import estimate_memory_gb, plan

VNET = NETWORKS.get("vnet")

pytestmark = pytest.mark.usefixtures("one_thread")


def _small(stage_plan, features: tuple[int, ...] | None = None):
    """The V-Net topology of `stage_plan` with few features (fast to build and run)."""
    features = features or (2,) * stage_plan.n_stages
    return VNET.plan_topology(dataclasses.replace(stage_plan, features_per_stage=features))


def test_isotropic_stages_get_5_on_every_axis_and_the_others_keep_the_plans_kernel() -> None:
    assert is_isotropic((3, 3, 3), (2, 2, 2)) and is_isotropic((3, 3), (1, 1))
    assert not is_isotropic((3, 3, 3), (1, 2, 2)) and not is_isotropic((1, 3, 3), (1, 1, 1))
    assert vnet_kernel((1, 3, 3), (1, 1, 1)) == (1, 3, 3)  # a kernel of 1 on an axis stays 1
    assert VNET.plan_topology(HIPPOCAMPUS).kernel_sizes == ((5, 5, 5),) * 4
    assert VNET.plan_topology(PLANS_2D).kernel_sizes == ((5, 5),) * 3
    # stage 1 is pooled (1, 2, 2): the axes are not treated alike there, so the plan's 3x3x3 stays
    assert VNET.plan_topology(ANISOTROPIC).kernel_sizes == ((1, 3, 3), (3, 3, 3), (5, 5, 5))
    acdc = VNET.plan_topology(ACDC)
    assert acdc.kernel_sizes == ((1, 3, 3), (3, 3, 3), (5, 5, 5), (5, 5, 5), (3, 3, 3), (3, 3, 3))
    assert VNET.plan_topology(acdc) == acdc  # idempotent: planning a V-Net topology again changes nothing
    # the built network's stage convs have these kernels, encoder and decoder
    net = build_network(_small(ANISOTROPIC), in_channels=1, num_classes=2)
    assert [tuple(stage.convs.convs[0].conv.kernel_size) for stage in net.encoder] == [(1, 3, 3), (3, 3, 3),
                                                                                        (5, 5, 5)]
    assert [tuple(level.convs.convs[0].conv.kernel_size) for level in net.decoder] == [(1, 3, 3), (3, 3, 3)]


@pytest.mark.parametrize(("n", "encoder", "decoder"), [(5, (1, 2, 3, 3, 3), (1, 2, 3, 3)), (3, (1, 2, 3), (1, 2)),
                                                       (6, (1, 2, 3, 3, 3, 3), (1, 2, 3, 3, 3))])
def test_convs_per_stage_are_the_originals_mapped_to_the_plans_stages(n: int, encoder: tuple[int, ...],
                                                                      decoder: tuple[int, ...]) -> None:
    """The original: 1, 2, 3, 3, 3 down and 3, 3, 2, 1 up (deepest first), i.e. min(level + 1, 3) per level."""
    topology = VNET.plan_topology(stage_plan(2, ((1, 1),) + ((2, 2),) * (n - 1), ((3, 3),) * n))
    assert topology.convs_per_stage == encoder and topology.convs_per_decoder_stage == decoder
    net = build_network(_small(topology), in_channels=1, num_classes=2)
    assert tuple(len(stage.convs.convs) for stage in net.encoder) == encoder
    assert tuple(len(level.convs.convs) for level in net.decoder) == decoder


def test_every_stage_adds_its_input_back() -> None:
    """With its convs' last norm zeroed, a stage returns nonlin(stage input): the residual path alone.
    Stage 0's input is the 1x1 projection of the scan, a deeper stage's the down conv's output, a decoder
    level's the upsampled features."""
    torch.manual_seed(0)
    net = build_network(_small(ANISOTROPIC, (4, 6, 8)), in_channels=2, num_classes=3).eval()
    for block in [*net.encoder, *net.decoder]:
        norm = block.convs.convs[-1].norm
        nn.init.zeros_(norm.weight)
        nn.init.zeros_(norm.bias)
    x = torch.randn(1, 2, 4, 8, 8)
    with torch.no_grad():
        skips = [net.encoder[0](x)]
        torch.testing.assert_close(skips[0], net.encoder[0].convs.acts[-1](net.encoder[0].entry(x)))
        for stage in net.encoder[1:]:
            skips.append(stage(skips[-1]))
            torch.testing.assert_close(skips[-1], stage.convs.acts[-1](stage.entry(skips[-2])))
        level = net.decoder[1]
        torch.testing.assert_close(level(skips[2], skips[1]), level.convs.acts[-1](level.up(skips[2])))


def test_prelu_is_the_nonlinearity_and_another_topology_nonlin_is_honoured() -> None:
    topology = _small(HIPPOCAMPUS, (2, 3, 4, 5))
    assert topology.nonlin == "prelu" and topology.norm == "instance"
    net = build_network(topology, in_channels=1, num_classes=2)
    prelus = [m for m in net.modules() if isinstance(m, nn.PReLU)]
    assert prelus and not any(isinstance(m, (nn.LeakyReLU, nn.ReLU)) for m in net.modules())
    # one learned slope per feature map, starting at 0.25 as in He et al. 2015
    assert all(p.num_parameters > 1 and torch.all(p.weight == 0.25) for p in prelus)
    relu = build_network(dataclasses.replace(topology, nonlin="relu", norm="batch"), in_channels=1, num_classes=2)
    assert any(isinstance(m, nn.ReLU) for m in relu.modules())
    assert not any(isinstance(m, (nn.PReLU, nn.InstanceNorm3d)) for m in relu.modules())


def test_down_and_up_are_convs_with_kernel_equal_to_stride() -> None:
    """No pooling: the V-Net downsamples with learned convs (the plan's strides per axis, no overlap)."""
    net = build_network(_small(ANISOTROPIC), in_channels=1, num_classes=2)
    downs = [stage.entry.conv for stage in net.encoder[1:]]
    ups = [level.up.conv for level in net.decoder]
    assert all(isinstance(c, nn.Conv3d) for c in downs) and all(isinstance(c, nn.ConvTranspose3d) for c in ups)
    assert [(c.kernel_size, c.stride, c.padding) for c in downs] == [((1, 2, 2), (1, 2, 2), (0, 0, 0)),
                                                                     ((2, 2, 2), (2, 2, 2), (0, 0, 0))]
    assert [(c.kernel_size, c.stride) for c in ups] == [((1, 2, 2), (1, 2, 2)), ((2, 2, 2), (2, 2, 2))]
    assert not any(isinstance(m, (nn.MaxPool3d, nn.AvgPool3d)) for m in net.modules())


def test_2d_outputs_with_and_without_deep_supervision() -> None:
    topology = _small(stage_plan(2, ((1, 1), (2, 2), (1, 2), (2, 2)), ((3, 3), (3, 3), (1, 3), (3, 3))))
    assert topology.kernel_sizes == ((5, 5), (5, 5), (1, 3), (5, 5))
    net = build_network(topology, in_channels=2, num_classes=3).eval()
    assert net.deep_supervision and len(net.output_heads) == 3
    with torch.no_grad():
        outputs = net(torch.randn(2, 2, 12, 40))
        assert [tuple(o.shape) for o in outputs] == [(2, 3, 12, 40), (2, 3, 6, 20), (2, 3, 6, 10)]
        net.deep_supervision = False
        assert tuple(net(torch.randn(1, 2, 8, 16)).shape) == (1, 3, 8, 16)


def test_hippocampus_plans_are_sane_and_larger_than_the_unets() -> None:
    unet, vnet = plan(*hippocampus()), plan(*hippocampus(), network="vnet")
    assert vnet.plans_name == "vnet" and list(vnet.configurations) == list(unet.configurations)
    for name, config in vnet.configurations.items():
        other = unet.configurations[name]
        assert config.batch_size >= 2 and config.patch_size == other.patch_size
        assert all(kernel == (5,) * config.dim for kernel in config.topology.kernel_sizes)
        assert config.parameter_count > 4 * other.parameter_count
        assert config.receptive_field > other.receptive_field
        assert estimate_memory_gb(config.topology, config.patch_size, config.batch_size, in_channels=1,
                                  num_classes=vnet.num_classes) <= 8


def test_abdominal_ct_plans_fit_the_budget_with_the_anisotropic_top_kept() -> None:
    vnet = plan(*abdominal_ct(), network="vnet")
    full = vnet.configurations["3d_fullres"]
    assert full.topology.kernel_sizes[:3] == ((1, 3, 3), (3, 3, 3), (5, 5, 5))
    for config in vnet.configurations.values():
        assert config.batch_size >= 2 and min(config.patch_size) >= 48
        assert estimate_memory_gb(config.topology, config.patch_size, 2, in_channels=1,
                                  num_classes=vnet.num_classes) <= 8
