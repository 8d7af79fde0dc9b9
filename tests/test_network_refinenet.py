"""The `refinenet` family's own properties: one RefineNet block per stage (the deepest without fusion), half-width
refinement paths, RCUs that start as the identity, the chained residual pooling (its windows per axis, the sum
of the chain, the edge-copy padding that equals -inf padding), bilinear fusion, the receptive field by hand and
the planner's sizes. Shapes, contract, the gradient field, ONNX and training: tests/test_families*.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_builders import field_extents
from test_families import ANISOTROPIC, HIPPOCAMPUS, stage_plan
from test_planning import hippocampus
from torch import nn

from autoseg.model.build import build_network
from autoseg.model.families import NETWORKS
from autoseg.model.networks.refinenet import CRP_BLOCKS, pool_window, refine_widths
from autoseg.model.refinenet_net import RCU, ChainedResidualPooling, SamePool
from autoseg.planning import plan

REFINENET = NETWORKS.get("refinenet")
#: Two 2D stages, kernels 3, stride 2: small enough for a receptive field worked out by hand.
TWO_STAGES = stage_plan(2, ((1, 1), (2, 2)), ((3, 3),) * 2, (2, 4))

pytestmark = pytest.mark.usefixtures("one_thread")


def _small(stage_plan, features: tuple[int, ...]):
    return REFINENET.plan_topology(dataclasses.replace(stage_plan, features_per_stage=features))


def test_one_block_per_stage_half_width_and_rcus_per_path_from_the_topology() -> None:
    topology = _small(ANISOTROPIC, (4, 8, 16))
    assert topology.convs_per_stage == (1, 3, 4) and topology.convs_per_decoder_stage == (2, 2)
    assert refine_widths(topology) == [2, 4, 8] and refine_widths(REFINENET.plan_topology(HIPPOCAMPUS)) == [
        16, 32, 64, 128]
    net = build_network(dataclasses.replace(topology, convs_per_decoder_stage=(3, 1)), in_channels=1, num_classes=2)
    deepest, middle, top = net.blocks[2], net.blocks[1], net.blocks[0]
    assert deepest.coarser is None and not hasattr(deepest, "fuse")  # a single input path: no fusion
    assert [len(b.path.rcus) for b in net.blocks] == [3, 1, 1]  # the deepest block takes the last entry
    assert len(top.coarser.rcus) == 3 and len(middle.coarser.rcus) == 1
    # encoder features enter through a 1x1 adaptation to the block's width; the coarser path keeps its own
    assert [b.path.adapt.conv.out_channels for b in net.blocks] == [2, 4, 8]
    assert isinstance(top.coarser.adapt, nn.Identity) and top.fuse_coarser.conv.in_channels == 4
    assert [head.in_channels for head in net.output_heads] == [2, 4]
    # paths run at their level's kernel: the coarser path of block 0 at level 1's (3, 3, 3)
    assert top.path.rcus[0].branch[1].conv.kernel_size == (1, 3, 3)
    assert top.coarser.rcus[0].branch[1].conv.kernel_size == (3, 3, 3)


def test_the_coarser_path_is_fused_by_linear_interpolation_of_the_levels_stride() -> None:
    net = build_network(_small(ANISOTROPIC, (2, 4, 8)), in_channels=1, num_classes=2)
    ups = [block.up for block in net.blocks[:2]]
    assert all(isinstance(up, nn.Upsample) and up.mode == "trilinear" for up in ups)
    assert [up.scale_factor for up in ups] == [(1.0, 2.0, 2.0), (2.0, 2.0, 2.0)]
    two_d = build_network(_small(TWO_STAGES, (2, 4)), in_channels=1, num_classes=2)
    assert two_d.blocks[0].up.mode == "bilinear"


def test_rcus_start_as_the_identity_and_keep_their_input() -> None:
    net = build_network(_small(ANISOTROPIC, (4, 8, 16)), in_channels=1, num_classes=2).eval()
    rcus = [m for m in net.modules() if isinstance(m, RCU)]
    assert len(rcus) == 3 * 2 + 2 * 2 + 3  # per block 2 RCUs per input path (3 + 2 paths) and one output RCU
    x = torch.randn(1, 2, 3, 6, 6)
    with torch.no_grad():
        kept = x.clone()
        assert torch.equal(net.blocks[0].out(x), x) and torch.equal(x, kept)  # no in-place nonlinearity
        nn.init.ones_(net.blocks[0].out.branch[-1].norm.weight)
        assert not torch.equal(net.blocks[0].out(x), x) and torch.equal(x, kept)


def test_crp_windows_follow_the_kernel_and_its_output_is_the_sum_of_the_chain() -> None:
    assert pool_window((1, 3, 3)) == (1, 5, 5) and pool_window((3, 3)) == (5, 5)
    topology = _small(ANISOTROPIC, (2, 4, 8))
    net = build_network(topology, in_channels=1, num_classes=2).eval()
    pools = [[m.pool.kernel_size for m in b.crp.modules() if isinstance(m, SamePool)] for b in net.blocks]
    assert pools == [[(1, 5, 5)] * CRP_BLOCKS, [(5, 5, 5)] * CRP_BLOCKS, [(5, 5, 5)] * CRP_BLOCKS]
    crp = ChainedResidualPooling(dataclasses.replace(topology, norm="batch"), 3, (1, 3, 3)).eval()
    x = torch.randn(2, 3, 4, 7, 9)
    with torch.no_grad():
        start = crp.act(x)
        first = crp.blocks[0](start)
        assert torch.allclose(crp(x), start + first + crp.blocks[1](first))


@pytest.mark.parametrize("shape", [(2, 3, 9, 11), (2, 3, 2, 4), (1, 2, 3, 4, 2)])
def test_same_pool_equals_max_pooling_with_minus_infinity_padding(shape: tuple[int, ...]) -> None:
    """Copies of the edge voxels pad like -inf, on maps smaller than the window too (2 and 4 voxels, window 5)."""
    dim = len(shape) - 2
    window = (5,) * dim if dim == 2 else (1, 5, 5)
    x = torch.randn(shape)
    reference = (nn.MaxPool3d if dim == 3 else nn.MaxPool2d)(window, stride=1, padding=tuple(w // 2 for w in window))
    if all(n >= w for n, w in zip(shape[2:], window)):
        assert torch.equal(SamePool(window, dim=dim)(x), reference(x))
    windows = [slice(max(0, i - w // 2), i + w // 2 + 1) for i, w in zip((1, 2, 1), window)]  # one voxel by hand
    brute = x[(0, 0, *windows[:dim])].max()
    assert tuple(SamePool(window, dim=dim)(x).shape) == shape
    assert SamePool(window, dim=dim)(x)[(0, 0, 1, 2, 1)[:dim + 2]] == brute


def test_receptive_field_by_hand_counts_the_pooling_windows() -> None:
    """Stem 3 + stage-0 block 2 x 2 = 7; stage 1: strided conv + 2 -> 9 (jump 2), 5 more convs + 20 = 29; deepest
    block: 4 RCU convs + 16, CRP 2 x (pool 5 + conv 3) at jump 2 + 24, output RCU + 8 = 77; level 0: coarser
    RCUs and fusion conv 5 x 4 = 97, interpolation 2 taps at jump 2 -> 99, CRP 2 x (4 + 2) -> 111, output RCU
    -> 115, of which the four max poolings give 2 x 4 x 2 + 2 x 4 = 24."""
    topology = _small(TWO_STAGES, (1, 1))
    assert REFINENET.receptive_field(topology) == (115, 115)
    size = (128, 8)
    extents = field_extents(topology, size, axis=0)
    assert sum(extents) / len(extents) == 115


def test_hippocampus_plan_is_sized_for_refinenet() -> None:
    unet, refine = plan(*hippocampus()), plan(*hippocampus(), network="refinenet")
    full, ours = unet.configurations["3d_fullres"], refine.configurations["3d_fullres"]
    assert ours.topology.architecture == "refinenet" and ours.batch_size >= 2
    assert ours.patch_size == full.patch_size  # small images: the whole image fits either way
    assert ours.parameter_count > full.parameter_count and ours.receptive_field > full.receptive_field
    net_parameters = REFINENET.parameters(ours.topology, in_channels=1, num_classes=refine.num_classes)
    assert ours.parameter_count == net_parameters
