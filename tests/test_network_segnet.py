"""`segnet` and `deconvnet`: what the family-wide tests (tests/test_families*.py) do not check.

SegNet's decoder unpools with the very indices its encoder's poolings produced, DeconvNet learns its
upsampling instead; both give 2D outputs and deep supervision, the ONNX export of the pooling indices and
the unpooling matches PyTorch, and the receptive-field helper leaves outputs unchanged.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_builders import spread_max_windows
from test_families import ANISOTROPIC, HIPPOCAMPUS, PLANS_2D
from torch import nn

from autoseg.model.build import build_network
from autoseg.model.families import NETWORKS

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dataclasses.replace(ANISOTROPIC, features_per_stage=(2, 4, 8))


def _network(name: str, topology=SMALL, **changes) -> nn.Module:
    topology = dataclasses.replace(NETWORKS.get(name).plan_topology(topology), **changes)
    torch.manual_seed(0)
    network = build_network(topology, in_channels=1, num_classes=3).eval()
    network.deep_supervision = False  # a test that wants the list sets it
    return network


def test_segnet_unpools_with_its_encoders_indices() -> None:
    """Each decoder level gets the indices of the pooling into the level below it, and puts every value
    back at its window's argmax: one nonzero per window at most, where the encoder found the maximum."""
    network = _network("segnet")
    pooled, unpooled = {}, {}
    for level, pool in enumerate(network.encoder.pools):
        pool.register_forward_hook(lambda m, i, out, level=level: pooled.__setitem__(level, (i[0], *out)))
    for level, block in enumerate(network.decoder):
        block.unpool.register_forward_hook(lambda m, i, out, level=level: unpooled.__setitem__(level, (*i, out)))
    with torch.no_grad():
        network(torch.randn(2, 1, 6, 28, 20))
    assert sorted(pooled) == sorted(unpooled) == [0, 1]
    for level in pooled:
        before, maxima, indices = pooled[level]
        values, used, out = unpooled[level]
        assert used is indices and out.shape == before.shape
        # the indices point at the window maxima of the map that was pooled ...
        assert torch.equal(before.flatten(2).gather(2, indices.flatten(2)), maxima.flatten(2))
        # ... and the unpooled map holds the decoder's values there, zeros everywhere else
        expected = torch.zeros_like(out.flatten(2)).scatter_(2, indices.flatten(2), values.flatten(2))
        assert torch.equal(out.flatten(2), expected)
        assert (out != 0).sum() <= values.numel()


def test_deconvnet_learns_its_upsampling_and_keeps_no_indices() -> None:
    for upsampling, kind in [("transposed_conv", nn.ConvTranspose3d), ("pixel_shuffle", nn.Conv3d)]:
        network = _network("deconvnet", upsampling=upsampling)
        modules = list(network.modules())
        assert not any(isinstance(m, nn.MaxUnpool3d) for m in modules)
        assert all(not pool.return_indices for pool in network.encoder.pools)
        assert all(isinstance(block.up.conv, kind) for block in network.decoder)
    segnet = _network("segnet")
    assert all(pool.return_indices for pool in segnet.encoder.pools)
    assert not any(isinstance(m, nn.ConvTranspose3d) for m in segnet.modules())


@pytest.mark.parametrize("name", ["segnet", "deconvnet"])
def test_2d_outputs_and_deep_supervision(name: str) -> None:
    network = _network(name, dataclasses.replace(PLANS_2D, features_per_stage=(2, 4, 8)))
    network.deep_supervision = True
    x = torch.randn(2, 1, 12, 20)
    with torch.no_grad():
        maps = network(x)
        network.deep_supervision = False
        single = network(x)
    assert [tuple(m.shape) for m in maps] == [(2, 3, 12, 20), (2, 3, 6, 10)]
    assert torch.allclose(maps[0], single) and len(network.output_heads) == 2


def test_segnet_is_lighter_than_the_unet_of_the_same_plan() -> None:
    """No skip concatenation (decoder convs at the level's width) and no upsampling weights; DeconvNet
    adds only its transposed convs to SegNet's count (same plan, same widths at every level)."""
    counts = {name: NETWORKS.get(name).parameters(NETWORKS.get(name).plan_topology(HIPPOCAMPUS), in_channels=1,
                                                  num_classes=3) for name in ("unet", "segnet", "deconvnet")}
    assert counts["segnet"] < counts["deconvnet"] < counts["unet"]


def test_the_field_helper_keeps_outputs_and_widens_gradients_to_the_window() -> None:
    """model_builders.spread_max_windows: the same outputs, a gradient that reaches every voxel that could be
    a window's max (a superset of the argmax-only gradient). Batch norm: instance norm couples all voxels."""
    network = _network("segnet", norm="batch").double()
    x = torch.rand(1, 1, 6, 64, 64, dtype=torch.float64, requires_grad=True)
    plain = network(x)
    plain[0, 0, 3, 32, 32].backward()
    narrow, x.grad = x.grad.ne(0), None
    spread_max_windows(network)
    spread = network(x)
    spread[0, 0, 3, 32, 32].backward()
    assert torch.equal(plain, spread)
    assert torch.equal(x.grad.ne(0) | narrow, x.grad.ne(0)) and x.grad.ne(0).sum() > narrow.sum()


def test_onnx_export_of_pooling_indices_and_unpooling_matches_torch(tmp_path) -> None:
    """Anisotropic (1, 2, 2) and (2, 2, 2) windows; the batch axis stays dynamic (exported with 2, run with 3).
    (tests/test_families_pipeline.py exports every family on the example dataset's isotropic plan.)"""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from autoseg.sharing.onnx_export import _export

    network = _network("segnet")
    model, exporter = _export(network, torch.randn(2, 1, 6, 28, 20), opset=None, output=tmp_path / "m.onnx")
    x = torch.randn(3, 1, 6, 28, 20)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = network(x).numpy()
    assert exporter == "dynamo"
    assert abs(session.run(None, {"image": x.numpy()})[0] - expected).max() < 1e-4
