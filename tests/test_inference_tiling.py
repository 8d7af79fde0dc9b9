"""Tiling and the sliding window: every voxel covered, weights normalised, identity in = identity out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from autoseg.inference.sliding import WindowSettings, sliding_window_logits
from autoseg.inference.tiling import (
    gaussian_axes,
    gaussian_importance,
    mirror_combinations,
    pad_to_patch,
    padding_for,
    tile_boxes,
    tile_starts,
    weight_sums,
)


@given(size=st.integers(1, 300), patch=st.integers(1, 64), step=st.floats(0.1, 1.0))
def test_tiles_cover_the_axis_without_leaving_it(size: int, patch: int, step: float) -> None:
    patch = min(patch, size)
    starts = tile_starts(size, patch, step)
    assert starts[0] == 0 and starts[-1] == size - patch
    assert starts == sorted(set(starts))
    covered = np.zeros(size, bool)
    for start in starts:
        covered[start:start + patch] = True
    assert covered.all()
    gaps = np.diff(starts)
    assert (gaps <= np.ceil(step * patch)).all()


def test_half_step_gives_nnunet_tile_counts() -> None:
    assert tile_starts(128, 64, 0.5) == [0, 32, 64]
    assert tile_starts(100, 64, 0.5) == [0, 18, 36]  # ceil(36 / 32) + 1 tiles, as nnU-Net
    assert tile_starts(64, 64, 0.5) == [0]
    with pytest.raises(ValueError):
        tile_starts(10, 12, 0.5)


def test_every_voxel_is_covered_in_3d() -> None:
    shape, patch = (37, 50, 23), (16, 20, 23)
    count = np.zeros(shape, int)
    for box in tile_boxes(shape, patch, 0.5):
        count[box] += 1
    assert count.min() >= 1


def test_gaussian_peaks_at_the_centre_and_never_vanishes() -> None:
    weights = gaussian_importance((9, 16, 5))
    assert weights.dtype == np.float32 and weights.max() == pytest.approx(1.0)
    assert weights.min() > 0
    assert np.unravel_index(weights.argmax(), weights.shape) == (4, 7, 2) or weights[4, 8, 2] == weights.max()
    assert np.allclose(weights, weights[::-1, ::-1, ::-1])


def test_padding_reaches_the_patch_and_is_undone() -> None:
    data = np.random.default_rng(0).random((2, 5, 40, 9)).astype(np.float32)
    padded, inner = pad_to_patch(data, (8, 32, 12))
    assert padded.shape == (2, 8, 40, 12)
    assert padding_for((5, 40, 9), (8, 32, 12)) == ((1, 2), (0, 0), (1, 2))
    assert np.array_equal(padded[(slice(None), *inner)], data)


def test_mirror_combinations_are_all_subsets() -> None:
    assert mirror_combinations((0, 1, 2)) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert mirror_combinations(()) == [()]


class Identity(nn.Module):
    """Returns its input as logits: the sliding window must then return the volume unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


@settings(max_examples=15, deadline=None)
@given(shape=st.tuples(st.integers(3, 30), st.integers(3, 30), st.integers(3, 30)),
       step=st.sampled_from([0.3, 0.5, 1.0]), mirror=st.booleans(), batch=st.integers(1, 3))
def test_identity_network_returns_its_input(shape, step, mirror, batch) -> None:
    data = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    window = WindowSettings(patch=(8, 12, 6), step=step, mirror_axes=(0, 1, 2) if mirror else (),
                            tiles_per_batch=batch)
    out = sliding_window_logits([Identity()], data, window, num_classes=2, device=torch.device("cpu"))
    assert out.shape == data.shape
    np.testing.assert_allclose(out.numpy(), data, atol=1e-5)


def test_two_d_window_runs_slice_by_slice_on_a_volume() -> None:
    data = np.random.default_rng(2).normal(size=(1, 5, 20, 17)).astype(np.float32)
    seen = []

    class Recorder(Identity):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(x.shape))
            return x * 1.0

    window = WindowSettings(patch=(16, 16), mirror_axes=(0, 1))
    out = sliding_window_logits([Recorder()], data, window, num_classes=1, device=torch.device("cpu"))
    np.testing.assert_allclose(out.numpy(), data, atol=1e-5)
    assert all(len(s) == 4 and s[2:] == (16, 16) for s in seen)


def test_several_networks_are_averaged() -> None:
    class Scale(nn.Module):
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = factor

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.factor

    data = np.ones((1, 10, 10, 10), np.float32)
    window = WindowSettings(patch=(8, 8, 8))
    out = sliding_window_logits([Scale(1.0), Scale(3.0)], data, window, num_classes=1, device=torch.device("cpu"))
    np.testing.assert_allclose(out.numpy(), 2.0, rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(shape=st.tuples(st.integers(8, 40), st.integers(6, 40), st.integers(6, 40)),
       step=st.sampled_from([0.3, 0.5, 1.0]))
def test_separable_weight_sums_equal_the_summed_weight_map(shape, step) -> None:
    patch = (8, 6, 6)
    dense = np.zeros(shape)
    importance = gaussian_importance(patch)
    for box in tile_boxes(shape, patch, step):
        dense[box] += importance
    axes = weight_sums(shape, patch, step, gaussian_axes(patch))
    separable = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    np.testing.assert_allclose(separable, dense, rtol=1e-5)


def _whole_volume_logits(networks, data: np.ndarray, settings: WindowSettings, num_classes: int) -> torch.Tensor:
    """The sliding window as it was before slabs (one logit sum for the whole padded volume): the reference."""
    from autoseg.inference.sliding import _mean_prediction

    window = settings.patch if len(settings.patch) == data.ndim - 1 else (1,) + tuple(settings.patch)
    padded, inner = pad_to_patch(data, window)
    volume = torch.from_numpy(np.ascontiguousarray(padded))
    axes = gaussian_axes(window)
    weight = torch.from_numpy(gaussian_importance(window))
    logits = torch.zeros((num_classes, *padded.shape[1:]))
    boxes = tile_boxes(padded.shape[1:], window, settings.step)
    with torch.inference_mode():
        for first in range(0, len(boxes), settings.tiles_per_batch):
            batch = boxes[first:first + settings.tiles_per_batch]
            tiles = torch.stack([volume[(slice(None), *box)] for box in batch])
            mean = _mean_prediction(networks, tiles, mirror_combinations(settings.mirror_axes),
                                    squeeze=len(window) - len(settings.patch), device=torch.device("cpu"), amp=None)
            for tile, box in zip(mean * weight, batch):
                logits[(slice(None), *box)] += tile
    for dim, total in enumerate(weight_sums(padded.shape[1:], window, settings.step, axes)):
        view = [1] * logits.ndim
        view[dim + 1] = -1
        logits /= torch.from_numpy(total.astype(np.float32)).reshape(view)
    return logits[(slice(None), *inner)]


@settings(max_examples=12, deadline=None)
@given(shape=st.tuples(st.integers(3, 26), st.integers(5, 20), st.integers(5, 20)),
       step=st.sampled_from([0.3, 0.5, 1.0]), batch=st.integers(1, 5), two_d=st.booleans())
def test_slabs_are_the_whole_volume_sum_bit_for_bit_and_each_row_comes_once(shape, step, batch, two_d) -> None:
    from autoseg.inference.sliding import sliding_window_slabs

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1) if two_d else nn.Conv3d(2, 3, 3, padding=1)
    data = np.random.default_rng(3).normal(size=(2, *shape)).astype(np.float32)
    window = WindowSettings(patch=(7, 9) if two_d else (6, 7, 9), step=step, mirror_axes=(0,), tiles_per_batch=batch)
    slabs = list(sliding_window_slabs([conv], data, window, num_classes=3, device=torch.device("cpu")))
    assert [s.start for s in slabs] == [0] + [s.stop for s in slabs[:-1]] and slabs[-1].stop == shape[0]
    together = torch.cat([s.logits for s in slabs], dim=1)
    assert torch.equal(together, _whole_volume_logits([conv], data, window, 3))


def test_the_open_rows_stay_about_one_patch_deep_however_long_the_volume() -> None:
    from autoseg.inference import sliding

    made = []
    original = sliding._accumulator

    def recording(num_classes, shape, device, dtype=torch.float32):
        made.append(tuple(shape))
        return original(num_classes, shape, device, dtype)

    data = np.zeros((1, 200, 12, 12), np.float32)
    try:
        sliding._accumulator = recording
        out = sliding_window_logits([Identity()], data, WindowSettings(patch=(16, 12, 12)), num_classes=1,
                                    device=torch.device("cpu"))
    finally:
        sliding._accumulator = original
    assert made == [(16, 12, 12)] and out.shape == (1, 200, 12, 12)


@pytest.mark.parametrize("two_networks, two_d", [(False, False), (True, False), (False, True)])
def test_blending_features_before_a_linear_head_equals_blending_logits(two_networks: bool, two_d: bool) -> None:
    """Issue 18: with more classes than features, the window blends the U-Net's last features and applies
    the 1x1 head per finished row: the same logits up to rounding, open rows that do not grow with classes."""
    import dataclasses

    from autoseg.inference import sliding
    from autoseg.inference.heads import BlendedOutputs
    from autoseg.model.build import build_network
    from autoseg.model.contract import Topology

    dims = 2 if two_d else 3
    topology = Topology(dim=dims, features_per_stage=(4, 8), kernel_sizes=((3,) * dims,) * 2,
                        strides=((1,) * dims, (2,) * dims), convs_per_stage=(1, 1), convs_per_decoder_stage=(1,))
    networks = []
    for seed in range(2 if two_networks else 1):
        torch.manual_seed(seed)
        network = build_network(dataclasses.replace(topology, deep_supervision=False), in_channels=1,
                                num_classes=20).eval()
        networks.append(network)
    outputs = BlendedOutputs(networks, 20)
    assert outputs.per_network and outputs.channels == 4 * len(networks)
    assert not BlendedOutputs(networks, 3).per_network  # fewer classes than features: logits, as before
    data = np.random.default_rng(5).normal(size=(1, 19, 14, 11)).astype(np.float32)
    window = WindowSettings(patch=(8, 8) if two_d else (8, 8, 8), mirror_axes=(0, 1), tiles_per_batch=2)
    made = []
    original = sliding._accumulator
    try:
        sliding._accumulator = lambda channels, shape, device, dtype=torch.float32: made.append(channels) or \
            original(channels, shape, device, dtype)
        blended = sliding_window_logits(networks, data, window, num_classes=20, device=torch.device("cpu"))
    finally:
        sliding._accumulator = original
    reference = _whole_volume_logits(networks, data, window, 20)
    assert made == [4 * len(networks)] and not any(network.features_only for network in networks)
    torch.testing.assert_close(blended, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(blended.argmax(0), reference.argmax(0))


def test_a_float16_accumulator_keeps_almost_every_label() -> None:
    """Issue 18: half the memory for the open rows; the argmax may change only at near-ties."""
    import dataclasses

    from autoseg.model.build import build_network
    from autoseg.model.contract import Topology

    topology = Topology(dim=3, features_per_stage=(8, 16), kernel_sizes=((3, 3, 3),) * 2,
                        strides=((1, 1, 1), (2, 2, 2)), convs_per_stage=(1, 1), convs_per_decoder_stage=(1,),
                        deep_supervision=False)
    torch.manual_seed(0)
    network = build_network(dataclasses.replace(topology), in_channels=1, num_classes=5).eval()
    data = np.random.default_rng(6).normal(size=(1, 30, 26, 22)).astype(np.float32)
    window = WindowSettings(patch=(16, 16, 16), mirror_axes=(0, 1))
    full = sliding_window_logits([network], data, window, num_classes=5, device=torch.device("cpu"))
    half = sliding_window_logits([network], data, dataclasses.replace(window, accumulator="float16"),
                                 num_classes=5, device=torch.device("cpu"))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0, atol=5e-3)
    assert (half.argmax(0) == full.argmax(0)).float().mean() > 0.995


@settings(max_examples=8, deadline=None)
@given(copies=st.integers(1, 9), batch=st.integers(1, 3), two_d=st.booleans(), per_network=st.booleans())
def test_mirrors_stacked_in_one_call_give_the_one_call_per_mirror_mean(copies, batch, two_d, per_network) -> None:
    """Stacking mirrored copies along the batch axis changes only how many calls run, not what is averaged."""
    from autoseg.inference.sliding import _mean_prediction

    torch.manual_seed(1)
    make = (lambda: nn.Conv2d(2, 3, 3, padding=1)) if two_d else (lambda: nn.Conv3d(2, 3, 3, padding=1))
    networks = [make(), make()]
    calls: list[int] = []
    for network in networks:
        network.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    tiles = torch.randn(batch, 2, *((6, 7) if two_d else (5, 6, 7)))
    flips = mirror_combinations((0, 1) if two_d else (0, 1, 2))
    with torch.inference_mode():
        one = _mean_prediction(networks, tiles, flips, squeeze=0, device=torch.device("cpu"), amp=None,
                               per_network=per_network)
        calls.clear()
        stacked = _mean_prediction(networks, tiles, flips, squeeze=0, device=torch.device("cpu"), amp=None,
                                   per_network=per_network, mirrors_per_call=copies)
    torch.testing.assert_close(stacked, one, rtol=1e-5, atol=1e-6)
    groups = -(-len(flips) // copies)
    assert len(calls) == 2 * groups and max(calls) == batch * min(copies, len(flips))


def test_mirrors_per_call_stack_small_patches_on_the_cpu_only() -> None:
    from autoseg.errors import SettingsError
    from autoseg.inference.predictor import CPU_CALL_VOXELS, mirrors_per_call

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert mirrors_per_call(None, 8, 1, (40, 56, 40), cpu) == 8  # Hippocampus: every copy in one call
    assert mirrors_per_call(None, 8, 1, (128, 128, 128), cpu) == 1
    assert mirrors_per_call(None, 8, 2, (64, 64, 64), cpu) == CPU_CALL_VOXELS // (2 * 64**3)
    assert mirrors_per_call(None, 8, 1, (40, 56, 40), cuda) == 1
    assert mirrors_per_call(None, 1, 1, (40, 56, 40), cpu) == 1  # no TTA
    assert mirrors_per_call(3, 8, 1, (128, 128, 128), cuda) == 3 and mirrors_per_call(16, 4, 1, (8, 8), cpu) == 4
    with pytest.raises(SettingsError, match="at least 1"):
        mirrors_per_call(0, 8, 1, (8, 8), cpu)
