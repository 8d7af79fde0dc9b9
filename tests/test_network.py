"""The torch U-Net (autoseg.model.build/unet/blocks) against the closed-form sizes and its contract."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
from model_builders import field_extents
from torch import nn

from autoseg.errors import SettingsError
from autoseg.model import Topology, parameter_count, receptive_field
from autoseg.model.blocks import BasicBlock, ConvNormAct, pixel_shuffle, pixel_unshuffle
from autoseg.model.build import build_network, count_parameters
from autoseg.model.families import NETWORKS
from autoseg.model.unet import InterpConvUp, PixelShuffleUp, init_weights

UPSAMPLING = ("transposed_conv", "interp_conv", "pixel_shuffle")


pytestmark = pytest.mark.usefixtures("one_thread")


def small(dim: int, **changes: object) -> Topology:
    """3 stages, 2-4-8 features, stride 2 twice (total 4), kernel 3."""
    topology = Topology(
        dim=dim,
        features_per_stage=(2, 4, 8),
        kernel_sizes=((3,) * dim,) * 3,
        strides=((1,) * dim, (2,) * dim, (2,) * dim),
        convs_per_stage=(2, 2, 2),
        convs_per_decoder_stage=(2, 2),
    )
    return dataclasses.replace(topology, **changes)


def anisotropic(**changes: object) -> Topology:
    """3D with a (1, 3, 3) top stage and an in-plane-only first stride: total stride (2, 4, 4)."""
    topology = Topology(
        dim=3,
        features_per_stage=(2, 4, 8),
        kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)),
        strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)),
        convs_per_stage=(2, 2, 1),
        convs_per_decoder_stage=(1, 2),
    )
    return dataclasses.replace(topology, **changes)


def hippocampus(**changes: object) -> Topology:
    """The real Hippocampus 3d_fullres plan: 4 stages 32-64-128-256, kernels 3, strides 2."""
    topology = Topology(3, (32, 64, 128, 256), ((3, 3, 3),) * 4, ((1, 1, 1),) + ((2, 2, 2),) * 3, (2,) * 4, (2,) * 3)
    return dataclasses.replace(topology, **changes)


def acdc_like() -> Topology:
    """Anisotropic 6-stage 3D plan: (1, 3, 3) top kernel, (1, 2, 2) strides, features capped at 320."""
    strides = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2))
    kernels = ((1, 3, 3),) + ((3, 3, 3),) * 5
    return Topology(3, (32, 64, 128, 256, 320, 320), kernels, strides, (2,) * 6, (2,) * 5)


def plain_2d() -> Topology:
    """2D plan: 6 stages 32..512, kernels 3, strides 2."""
    return Topology(2, (32, 64, 128, 256, 512, 512), ((3, 3),) * 6, ((1, 1),) + ((2, 2),) * 5, (2,) * 6, (2,) * 5)


# ---- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("upsampling", UPSAMPLING)
@pytest.mark.parametrize(
    ("topology", "patch"),
    [(small(2), (16, 12)), (small(3), (8, 12, 16)), (anisotropic(), (4, 16, 12))],
    ids=["2d", "3d", "anisotropic"],
)
@pytest.mark.parametrize("architecture", ["plain_unet", "resenc_unet"])
def test_output_shapes_with_and_without_deep_supervision(
    topology: Topology, patch: tuple[int, ...], upsampling: str, architecture: str
) -> None:
    topology = dataclasses.replace(topology, upsampling=upsampling, architecture=architecture)
    net = build_network(topology, in_channels=2, num_classes=3)
    x = torch.randn(2, 2, *patch)
    with torch.no_grad():
        outputs = net(x)
        assert isinstance(outputs, list) and len(outputs) == topology.n_stages - 1
        cumulative = [1] * topology.dim
        for level, out in enumerate(outputs):  # highest resolution first, patch / cumulative stride
            cumulative = [c * s for c, s in zip(cumulative, topology.strides[level])]
            assert tuple(out.shape) == (2, 3, *(p // c for p, c in zip(patch, cumulative)))
        net.deep_supervision = False
        single = net(x)
    assert isinstance(single, torch.Tensor) and tuple(single.shape) == (2, 3, *patch)
    torch.testing.assert_close(single, outputs[0])


def test_non_divisible_or_misshaped_input_raises_with_hint() -> None:
    net = build_network(small(3), in_channels=1, num_classes=2)
    with pytest.raises(SettingsError, match=r"not divisible by the network's total stride \(4, 4, 4\)") as info:
        net(torch.randn(1, 1, 8, 10, 8))
    assert "(8, 12, 8)" in info.value.hint
    with pytest.raises(SettingsError, match="expected"):
        net(torch.randn(1, 2, 8, 8, 8))
    with pytest.raises(SettingsError, match="3D"):
        net(torch.randn(1, 1, 8, 8))


def test_inconsistent_topology_raises() -> None:
    bad = dataclasses.replace(small(2), strides=((2, 2), (2, 2), (2, 2)), convs_per_decoder_stage=(2,))
    with pytest.raises(SettingsError, match="invalid network topology") as info:
        build_network(bad, in_channels=1, num_classes=2)
    assert "strides[0]" in str(info.value) and "convs_per_decoder_stage has 1" in str(info.value)


# ---- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("upsampling", UPSAMPLING)
@pytest.mark.parametrize("make", [hippocampus, acdc_like, plain_2d, lambda: small(2), anisotropic])
def test_parameter_count_matches_formula(make: Callable[[], Topology], upsampling: str) -> None:
    topology = dataclasses.replace(make(), upsampling=upsampling)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        net = build_network(topology, in_channels=2, num_classes=4)
    assert count_parameters(net) == parameter_count(topology, in_channels=2, num_classes=4)


def test_resenc_parameters_by_hand() -> None:
    """ResEnc is not in the size formulas: count a tiny one by hand (conv = in*out*taps + bias + 2*out norm)."""
    topology = Topology(2, (4, 8), ((3, 3),) * 2, ((1, 1), (2, 2)), (1, 2), (1,), architecture="resenc_unet")
    stem = 1 * 4 * 9 + 12
    stage0 = 2 * (4 * 4 * 9 + 12)  # one block 4 -> 4, no skip projection
    stage1 = (4 * 8 * 9 + 24) + (8 * 8 * 9 + 24) + (4 * 8 + 24) + 2 * (8 * 8 * 9 + 24)  # skip: pool + 1x1 conv + norm
    decoder = (8 * 4 * 4 + 4) + (8 * 4 * 9 + 12) + (4 * 3 + 3)  # transposed conv, one conv, head
    net = build_network(topology, in_channels=1, num_classes=3)
    assert count_parameters(net) == stem + stage0 + stage1 + decoder == 2975
    with pytest.raises(SettingsError):
        parameter_count(topology, in_channels=1, num_classes=3)


@pytest.mark.parametrize(
    ("topology", "size", "axis", "extents"),
    [
        (small(2), (48, 48), 0, {35}),
        (small(2, upsampling="interp_conv"), (48, 8), 0, {35}),
        (small(2, upsampling="pixel_shuffle"), (8, 48), 1, {35}),
        (anisotropic(), (24, 4, 4), 0, {11}),
        (anisotropic(), (2, 40, 4), 1, {23, 27}),
        (hippocampus(features_per_stage=(1, 1, 1, 1)), (104, 8, 8), 0, {71, 79}),
    ],
    ids=["2d", "2d-interp", "2d-shuffle", "aniso-z", "aniso-y", "hippocampus"],
)
def test_receptive_field_is_the_mean_field_over_a_stride_period(
    topology: Topology, size: tuple[int, ...], axis: int, extents: set[int]
) -> None:
    """The exact field of one output voxel can depend on its position modulo the total stride
    (the Hippocampus plan: 71 or 79 voxels); `receptive_field` is their mean (75)."""
    measured = field_extents(topology, size, axis=axis)
    assert set(measured) == extents
    assert sum(measured) / len(measured) == receptive_field(topology)[axis]


# ---- weights and state -----------------------------------------------------------------------


def test_state_dict_loads_with_deep_supervision_on_or_off() -> None:
    on = build_network(small(2), in_channels=1, num_classes=2)
    off = build_network(small(2, deep_supervision=False), in_channels=1, num_classes=2)
    assert on.deep_supervision and not off.deep_supervision
    off.load_state_dict(on.state_dict(), strict=True)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(off(x), on(x)[0])


def test_init_is_he_with_zero_bias_and_zero_last_norm_in_residual_blocks() -> None:
    net = build_network(small(3, architecture="resenc_unet", convs_per_stage=(1, 2, 2)), in_channels=1, num_classes=2)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)]
    assert all(not m.bias.any() for m in convs)
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 5 and all(not b.conv2.norm.weight.any() for b in blocks)
    big = build_network(hippocampus(), in_channels=1, num_classes=2).encoder.stages[2][1].conv
    gain = math.sqrt(2 / (1 + 1e-2**2))
    assert big.weight.std().item() == pytest.approx(gain / math.sqrt(128 * 27), rel=0.05)


@pytest.mark.parametrize("architecture", ["plain_unet", "resenc_unet"])
def test_forward_backward_reaches_every_parameter(architecture: str) -> None:
    net = build_network(small(3, architecture=architecture, upsampling="pixel_shuffle"), in_channels=1, num_classes=2)
    outputs = net(torch.randn(2, 1, 8, 8, 8))
    sum(out.square().mean() for out in outputs).backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("upsampling", UPSAMPLING)
def test_channels_last_gives_the_same_logits(upsampling: str) -> None:
    net = build_network(small(3, upsampling=upsampling), in_channels=1, num_classes=2).eval()
    x = torch.randn(2, 1, 8, 12, 8)
    with torch.no_grad():
        reference = net(x)
        net = net.to(memory_format=torch.channels_last_3d)
        fast = net(x.contiguous(memory_format=torch.channels_last_3d))
    for a, b in zip(fast, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- upsampling and shuffle ------------------------------------------------------------------


def test_pixel_shuffle_matches_torch_in_2d() -> None:
    x = torch.randn(2, 3 * 4, 5, 6)
    torch.testing.assert_close(pixel_shuffle(x, (2, 2)), nn.PixelShuffle(2)(x), rtol=0, atol=0)
    torch.testing.assert_close(pixel_unshuffle(nn.PixelShuffle(2)(x), (2, 2)), x, rtol=0, atol=0)


def test_anisotropic_3d_pixel_shuffle_inverts_and_places_channels() -> None:
    stride = (1, 2, 3)
    x = torch.randn(2, 4 * 6, 3, 4, 5)
    y = pixel_shuffle(x, stride)
    assert tuple(y.shape) == (2, 4, 3, 8, 15)
    torch.testing.assert_close(pixel_unshuffle(y, stride), x, rtol=0, atol=0)
    z = torch.randn(2, 4, 3, 8, 15)
    torch.testing.assert_close(pixel_shuffle(pixel_unshuffle(z, stride), stride), z, rtol=0, atol=0)
    # channel c * 6 + (oy * 3 + ox) lands at (z, y * 2 + oy, x * 3 + ox)
    assert y[1, 2, 1, 2 * 2 + 1, 3 * 3 + 2] == x[1, 2 * 6 + 1 * 3 + 2, 1, 2, 3]
    cl = pixel_shuffle(x.contiguous(memory_format=torch.channels_last_3d), stride)
    assert cl.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(cl, y, rtol=0, atol=0)
    with pytest.raises(ValueError):
        pixel_shuffle(torch.randn(1, 5, 2, 2, 2), stride)


@pytest.mark.parametrize("module", [PixelShuffleUp, InterpConvUp])
def test_checkerboard_free_upsampling_starts_blockwise_constant(module: type[nn.Module]) -> None:
    """At init both give every voxel of a stride block the same value (ICNR / nearest)."""
    stride = (1, 2, 2)
    up = module(6, 3, stride, dim=3)
    init_weights(up)
    with torch.no_grad():
        out = up(torch.randn(2, 6, 3, 4, 5))
    assert tuple(out.shape) == (2, 3, 3, 8, 10)
    blocks = pixel_unshuffle(out, stride).unflatten(1, (3, 4))  # (b, c, positions in block, *low)
    torch.testing.assert_close(blocks, blocks[:, :, :1].expand_as(blocks))


# ---- registries ------------------------------------------------------------------------------


def test_unknown_keys_suggest_the_right_one() -> None:
    assert {"unet", "resenc"} <= set(NETWORKS)
    with pytest.raises(SettingsError, match="architecture") as info:
        build_network(small(2, architecture="resenc_unt"), in_channels=1, num_classes=2)
    assert "did you mean 'resenc_unet'" in info.value.hint
    with pytest.raises(SettingsError, match="upsampling") as info:
        build_network(small(2, upsampling="pixelshuffle"), in_channels=1, num_classes=2)
    assert "did you mean 'pixel_shuffle'" in info.value.hint
    with pytest.raises(SettingsError, match="normalization") as info:
        ConvNormAct(1, 2, (3, 3), dim=2, norm="instnace")
    assert "did you mean 'instance'" in info.value.hint
