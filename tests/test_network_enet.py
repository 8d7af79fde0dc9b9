"""`enet`: what the family-wide tests (tests/test_families*.py) do not check.

The paper's layout on the plan's first four levels, the dilation rates and asymmetric convs per axis
(anisotropic kernels honoured), the initial block's concatenation, indices handed from each downsampling
to the matching upsampling, fewer than 1 M parameters on real plans, 2D outputs and a single output.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
import torch
from test_families import ACDC, ANISOTROPIC, HIPPOCAMPUS, PLANS_2D, WIDE_2D, stage_plan
from test_planning import abdominal_ct, hippocampus
from torch import nn

from autoseg.model.build import build_network, count_parameters
from autoseg.model.enet_net import DownBottleneck, InitialBlock, UpBottleneck
from autoseg.model.families import NETWORKS
from autoseg.model.networks.enet import layout
from autoseg.planning import plan

pytestmark = pytest.mark.usefixtures("one_thread")
ENET = NETWORKS.get("enet")


def _network(topology, *, in_channels: int = 1, **changes) -> nn.Module:
    torch.manual_seed(0)
    topology = dataclasses.replace(ENET.plan_topology(topology), **changes)
    return build_network(topology, in_channels=in_channels, num_classes=3).eval()


def test_the_papers_layout_on_the_plans_first_four_levels() -> None:
    topology = ENET.plan_topology(ACDC)
    assert topology.n_stages == 4 and topology.strides == ACDC.strides[:4]
    assert topology.kernel_sizes == ACDC.kernel_sizes[:4] and topology.features_per_stage == (16, 16, 64, 128)
    assert topology.nonlin == "prelu" and ENET.plan_topology(topology) == topology
    kinds = collections.Counter(step.kind for step in layout(topology))
    assert kinds == {"initial": 1, "down": 2, "regular": 4 + 4 + 2 + 1, "dilated": 8, "asymmetric": 4, "up": 2,
                     "full": 1}
    rates = [step.rate for step in layout(topology) if step.kind == "dilated"]
    assert rates == [2, 4, 8, 16] * 2
    # fewer stages: section 1 goes first, then the decoder shrinks with the levels
    assert [s.kind for s in layout(ENET.plan_topology(ANISOTROPIC))].count("regular") == 4 + 1
    two = ENET.plan_topology(stage_plan(2, ((1, 1), (2, 2)), ((3, 3),) * 2))
    assert [s.kind for s in layout(two)][:3] == ["initial", "regular", "dilated"]
    assert two.features_per_stage == (16, 128)


def test_dilation_and_asymmetric_convs_follow_the_levels_kernels() -> None:
    """Hippocampus: 3x3x3 everywhere, so rates on every axis and three 1D convs of 5; a (1, 3, 3) level
    (ANISOTROPIC's level 1 in a plan whose deepest kernel is in-plane) dilates and factorises in-plane only."""
    network = _network(HIPPOCAMPUS)
    dilations = {m.dilation for m in network.modules() if isinstance(m, nn.Conv3d)}
    assert {(r, r, r) for r in (2, 4, 8, 16)} <= dilations
    kernels = {m.kernel_size for m in network.modules() if isinstance(m, nn.Conv3d)}
    assert {(5, 1, 1), (1, 5, 1), (1, 1, 5)} <= kernels
    flat = dataclasses.replace(ANISOTROPIC, kernel_sizes=((1, 3, 3),) * 3)
    network = _network(flat)
    dilations = {m.dilation for m in network.modules() if isinstance(m, nn.Conv3d)}
    assert {(1, r, r) for r in (2, 4, 8, 16)} <= dilations and not any(d[0] > 1 for d in dilations)
    kernels = {m.kernel_size for m in network.modules() if isinstance(m, nn.Conv3d)}
    assert {(1, 5, 1), (1, 1, 5)} <= kernels and (5, 1, 1) not in kernels


def test_initial_block_concatenates_a_strided_conv_and_a_max_pooling() -> None:
    network = _network(HIPPOCAMPUS, in_channels=2)
    block = network.blocks[0]
    assert isinstance(block, InitialBlock) and block.conv.out_channels == 14 and block.conv.stride == (2, 2, 2)
    x = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad():
        pooled = torch.cat((block.conv(x), block.pool(x)), dim=1)[:, 14:]
    assert torch.equal(pooled, nn.functional.max_pool3d(x, 2))
    many = _network(HIPPOCAMPUS, in_channels=12).blocks[0]  # a cascade stage with many classes
    assert many.pool is None and many.conv.out_channels == 16


def test_each_upsampling_unpools_with_the_indices_of_its_downsampling() -> None:
    network = _network(HIPPOCAMPUS)
    produced, consumed = [], []
    for block in network.blocks:
        if isinstance(block, DownBottleneck):
            block.register_forward_hook(lambda m, i, out: produced.append(out[1]))
        elif isinstance(block, UpBottleneck):
            block.unpool.register_forward_hook(lambda m, i, out: consumed.append((i[1], out)))
    with torch.no_grad():
        network(torch.randn(1, 1, 16, 24, 16))
    assert len(produced) == len(consumed) == 2
    for indices, (used, out) in zip(reversed(produced), consumed):
        assert used is indices and out.shape[2:] == tuple(2 * n for n in indices.shape[2:])


@pytest.mark.parametrize("dataset", [hippocampus, abdominal_ct], ids=["hippocampus", "abdominal_ct"])
def test_planned_enets_stay_under_a_million_parameters(dataset) -> None:
    for name, config in plan(*dataset(), network="enet").configurations.items():
        topology = config.topology
        assert config.parameter_count < 1_000_000 and topology.n_stages <= 4, name
        assert all(p % s == 0 for p, s in zip(config.patch_size, topology.total_stride)) and config.batch_size >= 2


def test_2d_output_and_a_single_output() -> None:
    network = _network(WIDE_2D)
    assert count_parameters(network) < 500_000 and len(network.output_heads) == 1
    network.deep_supervision = True  # ENet has one output: the setting changes nothing
    with torch.no_grad():
        out = network(torch.randn(2, 1, 24, 40))
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (2, 3, 24, 40)
    small = _network(PLANS_2D, norm="batch")
    assert any(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in small.modules())


def test_the_head_is_the_final_transposed_conv_and_takes_the_prior() -> None:
    from autoseg.training.init import prior_init

    network = _network(HIPPOCAMPUS)
    head = network.output_heads[0]
    assert isinstance(head, nn.ConvTranspose3d) and head.kernel_size == head.stride == (2, 2, 2)
    prior_init(network, lambda: np.array([0.9, 0.07, 0.03]), False)
    assert torch.allclose(head.bias.softmax(0), torch.tensor([0.9, 0.07, 0.03]))


def test_two_levels_widen_after_the_initial_block() -> None:
    """A plan with one downsampling: the deepest sections follow the initial block, the first bottleneck
    widens 16 -> 128 with zero channels on its identity branch."""
    network = _network(stage_plan(2, ((1, 1), (2, 2)), ((3, 3),) * 2))
    with torch.no_grad():
        out = network(torch.randn(2, 1, 10, 6))
    assert tuple(out.shape) == (2, 3, 10, 6) and network.output_heads[0].in_channels == 128


class _LogitsAndIndices(nn.Module):
    """ENet.forward, also returning the indices of every downsampling (to compare them across runtimes)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pending, kept = [], []
        for step, block in zip(self.network.steps, self.network.blocks):
            if step.kind == "down":
                x, where = block(x)
                pending.append(where)
                kept.append(where)
            elif step.kind == "up":
                x = block(x, pending.pop())
            else:
                x = block(x)
        return (self.network.output_heads[0](x), *kept)


def _tied_windows(x: torch.Tensor, stride: tuple[int, ...]) -> int:
    """Pooling windows (kernel = stride) of x whose maximum occurs more than once."""
    pooled = nn.functional.max_pool2d(x, stride) if x.ndim == 4 else nn.functional.max_pool3d(x, stride)
    hits = (x == nn.functional.interpolate(pooled, scale_factor=stride, mode="nearest")).float()
    per_window = (nn.functional.avg_pool2d if x.ndim == 4 else nn.functional.avg_pool3d)(hits, stride)
    return int((per_window * float(np.prod(stride)) > 1.5).sum())


@pytest.mark.parametrize("dim", [2, 3])
def test_onnx_export_keeps_torchs_choice_among_tied_maxima(dim: int, tmp_path) -> None:
    """A mostly empty image (a constant background) gives constant regions in the feature maps and PReLU
    slopes of 0 give zeros, so many pooling windows hold their maximum several times. onnxruntime's MaxPool picks
    the same index among them as torch (the first), the ScatterND unpooling puts each value back where
    torch's does, and the logits agree. (A 2D patch of 4 x the total stride: on 2 x 2 deepest maps the 48
    instance norms over 4 values amplify float32 rounding itself to ~1e-2, in torch as in onnxruntime.)"""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from autoseg.sharing.onnx_export import _export

    plan = stage_plan(2, ((1, 1),) + ((2, 2),) * 3, ((3, 3),) * 4) if dim == 2 else HIPPOCAMPUS
    network = _network(plan)
    for prelu in (m for m in network.modules() if isinstance(m, nn.PReLU)):
        nn.init.zeros_(prelu.weight)  # ReLU: windows of non-positive values tie at 0
    wrapped = _LogitsAndIndices(network).eval()
    size = (64, 64) if dim == 2 else (32, 32, 32)
    x = torch.zeros(3, 1, *size)
    x[(...,) + (slice(0, 6),) * dim] = torch.randn(3, 1, *(6,) * dim, generator=torch.Generator().manual_seed(1))
    ties = []
    for block in network.blocks:
        if isinstance(block, DownBottleneck):
            block.register_forward_pre_hook(lambda m, i: ties.append(_tied_windows(i[0], m.pool.kernel_size)))
    with torch.no_grad():
        expected = [t.numpy() for t in wrapped(x)]
    assert len(ties) == 2 and min(ties) > 0, ties  # the check below covers tied windows at both downsamplings
    model, exporter = _export(wrapped, x[:2], opset=None, output=tmp_path / "m.onnx")  # batch 2, run with 3
    assert exporter == "dynamo"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, *indices = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert len(indices) == 2 and all(np.array_equal(a, b) for a, b in zip(indices, expected[1:]))
    assert abs(logits - expected[0]).max() < 1e-4 * max(1.0, float(abs(expected[0]).max()))
