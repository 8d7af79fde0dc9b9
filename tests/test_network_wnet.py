"""The `wnet` family's own properties: two half-width U-Nets, the second fed the image and the first one's
probabilities, two supervision groups and their heads, joint training, the composed receptive field and the
sizes the planner gives it. Shapes, contract, ONNX and training are covered for every family in
tests/test_families*.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_builders import field_extents
from test_families import ACDC, ANISOTROPIC, HIPPOCAMPUS, UPSAMPLING, stage_plan
from test_planning import abdominal_ct, hippocampus
from torch.nn import functional as F

from autoseg.model.build import build_network, count_parameters
from autoseg.model.families import NETWORKS
from autoseg.model.networks.wnet import composed_field, half_width, unet_path
from autoseg.model.receptive import receptive_field
from autoseg.model.unet import UPSAMPLING as UPSAMPLING_STEPS
from autoseg.planning import estimate_memory_gb, plan
from autoseg.training.init import prior_init

WNET = NETWORKS.get("wnet")

pytestmark = pytest.mark.usefixtures("one_thread")


def _small(stage_plan, features: tuple[int, ...] = (4, 6, 8)):
    """The W-Net topology of `stage_plan` with few features (each U-Net gets half)."""
    return WNET.plan_topology(dataclasses.replace(stage_plan, features_per_stage=features))


def test_each_unet_gets_half_the_plans_features_and_its_stages_unchanged() -> None:
    topology = WNET.plan_topology(ACDC)
    assert topology.features_per_stage == (16, 32, 64, 128, 160, 160) and half_width((1, 3)) == (1, 1)
    assert (topology.kernel_sizes, topology.strides) == (ACDC.kernel_sizes, ACDC.strides)
    assert topology.convs_per_stage == ACDC.convs_per_stage and topology.architecture == "wnet"
    assert WNET.plan_topology(topology) == topology  # planning a W-Net topology again does not halve twice
    assert WNET.plan_topology(ACDC, "pixel_shuffle").upsampling == "pixel_shuffle"
    net = build_network(_small(ANISOTROPIC), in_channels=2, num_classes=3)
    for unet, width in ((net.first, 2), (net.second, 5)):  # the second reads the image and 3 probabilities
        assert unet.encoder.stages[0][0].conv.in_channels == width
        assert [s[0].conv.out_channels for s in unet.encoder.stages] == [2, 3, 4]
        assert [tuple(s[0].conv.kernel_size) for s in unet.encoder.stages] == [(1, 3, 3), (3, 3, 3), (3, 3, 3)]
        assert [tuple(s[0].conv.stride) for s in unet.encoder.stages] == [(1, 1, 1), (1, 2, 2), (2, 2, 2)]


@pytest.mark.parametrize("num_classes", [3, 1])
def test_the_second_unet_reads_the_image_and_the_first_ones_probabilities(num_classes: int) -> None:
    torch.manual_seed(0)
    net = build_network(_small(ANISOTROPIC), in_channels=2, num_classes=num_classes).eval()
    net.deep_supervision = False
    seen = []
    net.second.register_forward_pre_hook(lambda _module, inputs: seen.append(inputs[0]))
    x = torch.randn(2, 2, 4, 12, 8)
    with torch.no_grad():
        out = net(x)
        coarse = net.first(x)
    image, probabilities = seen[0][:, :2], seen[0][:, 2:]
    torch.testing.assert_close(image, x)
    expected = F.softmax(coarse, dim=1) if num_classes > 1 else torch.sigmoid(coarse)
    torch.testing.assert_close(probabilities, expected)
    if num_classes > 1:
        torch.testing.assert_close(probabilities.sum(1), torch.ones_like(probabilities[:, 0]))
    assert tuple(out.shape) == (2, num_classes, 4, 12, 8)


def test_deep_supervision_gives_the_second_unets_maps_then_the_firsts_and_heads_in_that_order() -> None:
    torch.manual_seed(0)
    topology = _small(stage_plan(2, ((1, 1), (2, 2), (1, 2), (2, 2)), ((3, 3), (3, 3), (1, 3), (3, 3))), (2,) * 4)
    net = build_network(topology, in_channels=1, num_classes=2).eval()
    assert net.deep_supervision and net.first.deep_supervision and net.second.deep_supervision
    x = torch.randn(1, 1, 8, 24)
    with torch.no_grad():
        outputs = net(x)
        first = net.first(x)
        second = net.second(torch.cat((x, F.softmax(first[0], dim=1)), dim=1))
    assert [tuple(o.shape[2:]) for o in outputs] == [(8, 24), (4, 12), (4, 6)] * 2
    for got, want in zip(outputs, [*second, *first]):
        torch.testing.assert_close(got, want)
    net.deep_supervision = False  # applies to both U-Nets
    assert not net.first.deep_supervision and not net.second.deep_supervision
    with torch.no_grad():
        torch.testing.assert_close(net(x), second[0])
    assert net.output_heads == [*net.second.output_heads, *net.first.output_heads] and len(net.output_heads) == 6


def test_the_prior_init_starts_both_unets_at_the_class_prior() -> None:
    net = build_network(_small(ANISOTROPIC), in_channels=1, num_classes=3)
    prior_init(net, lambda: torch.tensor([0.9, 0.08, 0.02]).numpy(), False)
    biases = [head.bias.detach() for head in [*net.second.output_heads, *net.first.output_heads]]
    assert all(torch.equal(b, biases[0]) for b in biases)
    torch.testing.assert_close(F.softmax(biases[0], 0), torch.tensor([0.9, 0.08, 0.02]))


def test_the_final_loss_trains_both_unets_jointly() -> None:
    torch.manual_seed(0)
    net = build_network(_small(ANISOTROPIC), in_channels=1, num_classes=2)
    net.deep_supervision = False
    net(torch.randn(1, 1, 4, 8, 8)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.first.encoder.parameters())
    counted = count_parameters(net)
    assert counted == count_parameters(net.first) + count_parameters(net.second)


def test_receptive_field_follows_the_window_through_both_unets() -> None:
    """On a 4-stage plan a U-Net's window extent changes with the output's position in a stride period, and
    the composed field is not 2F - 1; the formula over `path` equals the gradient-measured mean anyway."""
    topology = _small(stage_plan(2, ((1, 1),) + ((2, 2),) * 3, ((3, 3),) * 4), (1,) * 4)
    single = receptive_field(unet_path(topology), 2)
    assert single == (75, 75) and composed_field(topology) == (147, 147) != (2 * 75 - 1,) * 2
    assert WNET.receptive_field(topology) == (147, 147)
    extents = field_extents(topology, (184, 16), axis=0)
    assert len(set(extents)) > 1 and sum(extents) / len(extents) == 147
    assert WNET.receptive_field(WNET.plan_topology(HIPPOCAMPUS)) == (147, 147, 147)


@pytest.mark.parametrize("upsampling", UPSAMPLING)
def test_both_unets_use_the_plans_upsampling_step_and_the_sizes_follow(upsampling: str) -> None:
    topology = WNET.plan_topology(dataclasses.replace(ANISOTROPIC, features_per_stage=(4, 8, 16)), upsampling)
    net = build_network(topology, in_channels=2, num_classes=3)
    kinds = {type(level.up) for unet in (net.first, net.second) for level in unet.decoder}
    assert kinds == {UPSAMPLING_STEPS.get(upsampling)}
    assert WNET.parameters(topology, in_channels=2, num_classes=3) == count_parameters(net)


def test_hippocampus_plans_get_the_unets_patch_and_batch_with_half_its_parameters() -> None:
    unet, wnet = plan(*hippocampus()), plan(*hippocampus(), network="wnet")
    assert wnet.plans_name == "wnet" and list(wnet.configurations) == list(unet.configurations)
    for name, config in wnet.configurations.items():
        other = unet.configurations[name]
        assert (config.patch_size, config.batch_size) == (other.patch_size, other.batch_size)
        assert 0.45 < config.parameter_count / other.parameter_count < 0.55
        assert all(w == 2 * u - 3 for w, u in zip(config.receptive_field, other.receptive_field))
        assert estimate_memory_gb(config.topology, config.patch_size, config.batch_size, in_channels=1,
                                  num_classes=wnet.num_classes) <= 8


def test_abdominal_ct_plans_keep_the_unets_patch_under_the_budget() -> None:
    unet, wnet = plan(*abdominal_ct()), plan(*abdominal_ct(), network="wnet")
    full, other = wnet.configurations["3d_fullres"], unet.configurations["3d_fullres"]
    assert full.patch_size == other.patch_size and full.batch_size >= 2 and not full.notes
    assert estimate_memory_gb(full.topology, full.patch_size, full.batch_size, in_channels=1,
                              num_classes=wnet.num_classes) <= 8
