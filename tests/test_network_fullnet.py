"""The `fullnet` family's own properties: no map ever leaves the input resolution (any patch works), dense
connectivity with the growth rate, dilation = the plan's cumulative stride per axis (1 on 1-tap axes), the
layers per block, the counted concatenations, the output head and the plans it gets. Shapes, contract,
receptive field, ONNX and training are covered for every family in tests/test_families*.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_families import ACDC, ANISOTROPIC, HIPPOCAMPUS, PLANS_2D, stage_plan
from test_planning import abdominal_ct, hippocampus
from torch import nn

from autoseg.errors import SettingsError
from autoseg.model.build import build_network
from autoseg.model.families import NETWORKS
from autoseg.model.fullnet_net import DenseLayer
from autoseg.model.networks.fullnet import block_dilations, dense_layers, growth_rate
from autoseg.planning import estimate_memory_gb, plan
from autoseg.training.init import prior_zero_init

FULLNET = NETWORKS.get("fullnet")

pytestmark = pytest.mark.usefixtures("one_thread")


def _small(stage_plan, width: int = 4):
    """The FullNet topology of `stage_plan` with `width` features (fast to build and run)."""
    return FULLNET.plan_topology(dataclasses.replace(stage_plan, features_per_stage=(width,) * stage_plan.n_stages))


def test_every_map_keeps_the_input_resolution_and_any_patch_works() -> None:
    """No stride anywhere: every conv output has the patch's shape, also for a patch that the plan's total
    stride (4, 4) does not divide."""
    net = build_network(_small(PLANS_2D), in_channels=2, num_classes=3).eval()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.stride == (1, 1) for c in convs)
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.Upsample)) for m in net.modules())
    shapes = set()
    for conv in convs:
        conv.register_forward_hook(lambda _m, _i, out: shapes.add(tuple(out.shape[2:])))
    with torch.no_grad():
        assert tuple(net(torch.randn(1, 2, 7, 13)).shape) == (1, 3, 7, 13)
    assert shapes == {(7, 13)}
    with pytest.raises(SettingsError, match="input"):
        net(torch.randn(1, 1, 7, 13))  # wrong channel count still fails clearly


def test_dilation_is_the_plans_cumulative_stride_per_axis() -> None:
    assert block_dilations(FULLNET.plan_topology(HIPPOCAMPUS)) == [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)]
    # ACDC pools z later than y/x: z gets less dilation; stage 0's (1, 3, 3) kernel keeps z at 1
    acdc = FULLNET.plan_topology(ACDC)
    assert block_dilations(acdc) == [(1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 8, 8), (4, 16, 16), (4, 32, 32)]
    # a kernel of 1 on an axis stays 1 (and has no rate) in every block
    flat = _small(dataclasses.replace(ANISOTROPIC, kernel_sizes=((1, 3, 3),) * 3))
    assert block_dilations(flat) == [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    net = build_network(flat, in_channels=1, num_classes=2)
    layers = [m.conv.conv for m in net.modules() if isinstance(m, DenseLayer)]
    assert {(c.kernel_size, c.dilation, c.padding) for c in layers[-2:]} == {((1, 3, 3), (1, 4, 4), (0, 4, 4))}
    assert {c.kernel_size for c in layers} == {(1, 3, 3)}


def test_dense_blocks_grow_by_the_growth_rate_and_transitions_compress() -> None:
    """nnU-Net's plans (2 encoder + 2 decoder convs per level): 4 layers per block, 2 in the deepest; each
    layer sees the block input and every earlier output; the 1x1 transition returns to the block width."""
    topology = FULLNET.plan_topology(HIPPOCAMPUS)
    assert dense_layers(HIPPOCAMPUS) == topology.convs_per_stage == (4, 4, 4, 2)
    assert topology.features_per_stage == (32,) * 4 and growth_rate(topology, 0) == 16
    assert FULLNET.plan_topology(topology) == topology  # idempotent
    net = build_network(_small(HIPPOCAMPUS, 6), in_channels=1, num_classes=2)
    for block, layers in zip(net.blocks, (4, 4, 4, 2)):
        dense = [m for m in block if isinstance(m, DenseLayer)]
        assert [m.conv.conv.in_channels for m in dense] == [6 + 3 * i for i in range(layers)]
        assert block[-1].conv.kernel_size == (1, 1, 1) and block[-1].conv.in_channels == 6 + 3 * layers
        assert block[-1].conv.out_channels == 6
    x = torch.randn(1, 6, 4, 5, 3)
    assert torch.equal(net.blocks[0][0](x)[:, :6], x)  # a dense layer keeps its input, then adds its own


def test_the_estimator_counts_every_concatenation() -> None:
    """Activation elements per voxel: stem w, per block the concatenations w + i g (i = 1..L), the L
    convs' g each and the transition's w, then the head: the quadratic growth that makes FullNet heavy."""
    topology = _small(HIPPOCAMPUS, 8)
    w, g = 8, 4
    per_voxel = w + sum(sum(w + i * g for i in range(1, n + 1)) + n * g + w for n in (4, 4, 4, 2)) + 3
    patch = (16, 24, 8)
    assert FULLNET.elements(topology, patch, in_channels=1, num_classes=3) == per_voxel * 16 * 24 * 8


def test_receptive_field_grows_like_the_unets_and_matches_the_paths_rule() -> None:
    """Stem 3, then 2 (k - 1) x dilation per layer: 1 + 2 + 8 (1 + 2 + 4) + 4 x 8 = 91 voxels."""
    assert FULLNET.receptive_field(FULLNET.plan_topology(HIPPOCAMPUS)) == (91, 91, 91)
    assert NETWORKS.get("unet").receptive_field(HIPPOCAMPUS) == (75, 75, 75)
    # 2D with a 1-tap kernel on y in the last stage: y gains nothing there
    topology = FULLNET.plan_topology(stage_plan(2, ((1, 1), (2, 2), (2, 2)), ((3, 3), (3, 3), (1, 3))))
    assert FULLNET.receptive_field(topology) == (1 + 2 + 8 * (1 + 2), 1 + 2 + 8 * (1 + 2) + 4 * 4)


def test_single_output_and_the_head_carries_the_prior() -> None:
    net = build_network(_small(PLANS_2D), in_channels=1, num_classes=3).eval()
    assert net.deep_supervision is False and not FULLNET.deep_supervision and net.output_heads == [net.head]
    with pytest.raises(SettingsError, match="single output"):
        net.deep_supervision = True
    prior_zero_init(net, lambda: np.array([0.5, 0.3, 0.2]), False)
    with torch.no_grad():
        probabilities = net(torch.randn(1, 1, 12, 20)).softmax(1)
    assert torch.allclose(probabilities, torch.tensor([0.5, 0.3, 0.2]).view(1, 3, 1, 1), atol=1e-6)


def test_plans_fit_the_budget_and_note_the_smaller_patch() -> None:
    """Hippocampus: the U-Net's patch still fits (no note); abdominal CT: the patch search shrinks it to the
    budget and the planner says so. Planned patches stay multiples of the plan's total stride."""
    for fingerprint in (hippocampus, abdominal_ct):
        unet, fullnet = plan(*fingerprint()), plan(*fingerprint(), network="fullnet")
        for name, config in fullnet.configurations.items():
            other = unet.configurations[name]
            assert config.batch_size >= 2 and config.parameter_count < other.parameter_count / 10
            assert estimate_memory_gb(config.topology, config.patch_size, 2, in_channels=1,
                                      num_classes=fullnet.num_classes) <= 8
            assert all(p % s == 0 for p, s in zip(config.patch_size, config.topology.total_stride))
            smaller = np.prod(config.patch_size) < np.prod(other.patch_size)
            assert smaller == any("fullnet needs more memory per voxel" in n for n in config.notes)
            assert smaller == (fingerprint is abdominal_ct)
