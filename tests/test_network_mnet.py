"""The `mnet` family's own properties: the image pyramid's legs, max pooling, side outputs averaged at full
resolution and their two supervision groups, the heads' prior, the legs' share of the receptive field and
the sizes the planner gives it. Shapes, contract, ONNX and training are covered for every family in
tests/test_families*.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_builders import field_extents
from test_families import ANISOTROPIC, HIPPOCAMPUS, UPSAMPLING, stage_plan
from test_planning import abdominal_ct, hippocampus
from torch import nn
from torch.nn import functional as F

from autoseg.model.build import build_network, count_parameters
from autoseg.model.families import NETWORKS
from autoseg.model.networks.mnet import leg_excess
from autoseg.model.networks.segnet import encoder_path
from autoseg.model.networks.unet import decoder_path
from autoseg.model.receptive import receptive_field
from autoseg.planning import estimate_memory_gb, plan
from autoseg.training.init import prior_zero_init

MNET = NETWORKS.get("mnet")
PLAN_2D = stage_plan(2, ((1, 1), (2, 2), (1, 2), (2, 2)), ((3, 3), (3, 3), (1, 3), (3, 3)), (2, 3, 4, 5))

pytestmark = pytest.mark.usefixtures("one_thread")


def _small(stage_plan, features: tuple[int, ...] = (2, 3, 4)):
    return MNET.plan_topology(dataclasses.replace(stage_plan, features_per_stage=features))


def test_every_encoder_level_gets_the_input_averaged_to_its_resolution_through_a_leg() -> None:
    torch.manual_seed(0)
    net = build_network(_small(ANISOTROPIC), in_channels=2, num_classes=3).eval()
    legs = []
    for stage in net.encoder:
        stage.leg.register_forward_pre_hook(lambda _module, inputs: legs.append(inputs[0]))
    x = torch.randn(1, 2, 4, 12, 8)
    with torch.no_grad():
        net(x)
    torch.testing.assert_close(legs[0], F.avg_pool3d(x, (1, 2, 2)))
    torch.testing.assert_close(legs[1], F.avg_pool3d(x, (2, 4, 4)))
    assert [(s.leg.conv.in_channels, s.leg.conv.out_channels, s.leg.conv.kernel_size) for s in net.encoder] == [
        (2, 3, (3, 3, 3)), (2, 4, (3, 3, 3))]
    # the stage's convs read the pooled level above concatenated with the leg
    assert [s.convs[0].conv.in_channels for s in net.encoder] == [2 + 3, 3 + 4]


def test_the_encoder_max_pools_with_the_plans_strides_and_never_strides_a_conv() -> None:
    net = build_network(_small(ANISOTROPIC), in_channels=1, num_classes=2)
    assert [(s.pool.kernel_size, s.pool.stride) for s in net.encoder] == [((1, 2, 2), (1, 2, 2)),
                                                                         ((2, 2, 2), (2, 2, 2))]
    convs = [m for m in [*net.stem.modules(), *net.encoder.modules()] if isinstance(m, nn.Conv3d)]
    assert convs and all(c.stride == (1, 1, 1) for c in convs)
    assert [tuple(c.kernel_size) for c in convs[:2]] == [(1, 3, 3)] * 2  # stage 0 keeps the plan's kernel


def test_side_outputs_are_averaged_at_full_resolution_and_each_is_supervised_at_its_own() -> None:
    torch.manual_seed(0)
    net = build_network(_small(PLAN_2D, (2, 3, 4, 5)), in_channels=1, num_classes=2).eval()
    sides = []
    for level in net.decoder:
        level.head.register_forward_hook(lambda _module, _inputs, output: sides.append(output))
    x = torch.randn(2, 1, 8, 24)
    with torch.no_grad():
        outputs = net(x)
    sides = sides[::-1]  # computed deepest first
    assert [tuple(s.shape[2:]) for s in sides] == [(8, 24), (4, 12), (4, 6)]
    full = [sides[0], sides[1].repeat_interleave(2, 2).repeat_interleave(2, 3),
            sides[2].repeat_interleave(2, 2).repeat_interleave(4, 3)]
    fused = torch.stack(full).mean(0)
    assert len(outputs) == 6 and [tuple(o.shape[2:]) for o in outputs] == [(8, 24), (4, 12), (4, 6)] * 2
    for got, want in zip(outputs, [fused, sides[1], sides[2], *sides]):
        torch.testing.assert_close(got, want)
    net.deep_supervision = False
    with torch.no_grad():
        torch.testing.assert_close(net(x), fused)
    assert net.output_heads == [level.head for level in net.decoder]


def test_with_the_prior_on_every_side_head_the_fused_map_starts_at_the_prior() -> None:
    net = build_network(_small(ANISOTROPIC), in_channels=1, num_classes=3).eval()
    net.deep_supervision = False
    prior_zero_init(net, lambda: torch.tensor([0.9, 0.08, 0.02]).numpy(), False)
    with torch.no_grad():
        probabilities = F.softmax(net(torch.randn(1, 1, 4, 12, 8)), dim=1)
    torch.testing.assert_close(probabilities[0, :, 1, 2, 3], torch.tensor([0.9, 0.08, 0.02]))


def test_a_leg_widens_the_field_along_an_axis_the_levels_above_do_not_convolve() -> None:
    """Anisotropic plan: stage 0's kernel is 1 along z, the level-1 leg's 3; the leg reaches 2 voxels further
    in z than the encoder's own path, which the formula's `leg_excess` layer adds (measured by gradients)."""
    topology = _small(ANISOTROPIC, (1, 1, 1))
    own = receptive_field(encoder_path(topology) + decoder_path(topology), 3)
    assert leg_excess(topology) == (2, 0, 0) and MNET.receptive_field(topology) == (own[0] + 2, *own[1:])
    extents = field_extents(topology, (32, 8, 8), axis=0)
    assert sum(extents) / len(extents) == own[0] + 2 == 20
    assert leg_excess(MNET.plan_topology(HIPPOCAMPUS)) == (0, 0, 0)


@pytest.mark.parametrize("upsampling", UPSAMPLING)
def test_the_plans_upsampling_step_builds_the_decoder_and_the_sizes_follow(upsampling: str) -> None:
    topology = MNET.plan_topology(dataclasses.replace(ANISOTROPIC, features_per_stage=(4, 8, 16)), upsampling)
    assert topology.upsampling == upsampling
    net = build_network(topology, in_channels=2, num_classes=3)
    assert MNET.parameters(topology, in_channels=2, num_classes=3) == count_parameters(net)
    with torch.no_grad():
        assert tuple(net.eval()(torch.randn(1, 2, 2, 12, 4))[0].shape) == (1, 3, 2, 12, 4)


def test_hippocampus_plans_are_sane() -> None:
    unet, mnet = plan(*hippocampus()), plan(*hippocampus(), network="mnet")
    assert mnet.plans_name == "mnet" and list(mnet.configurations) == list(unet.configurations)
    for name, config in mnet.configurations.items():
        other = unet.configurations[name]
        assert config.patch_size == other.patch_size and config.batch_size >= 2
        assert 1.2 < config.parameter_count / other.parameter_count < 1.6
        assert config.receptive_field > other.receptive_field
        assert estimate_memory_gb(config.topology, config.patch_size, config.batch_size, in_channels=1,
                                  num_classes=mnet.num_classes) <= 8


def test_abdominal_ct_plans_fit_the_budget() -> None:
    mnet = plan(*abdominal_ct(), network="mnet")
    for name in ("3d_fullres", "3d_lowres"):
        config = mnet.configurations[name]
        assert config.batch_size >= 2 and min(config.patch_size) >= 48
        assert estimate_memory_gb(config.topology, config.patch_size, 2, in_channels=1,
                                  num_classes=mnet.num_classes) <= 8
