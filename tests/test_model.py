"""Closed-form network sizes (autoseg.model.size) against hand counts and nnU-Net's decisions."""

from __future__ import annotations

import subprocess
import sys

import pytest

from autoseg.errors import SettingsError
from autoseg.model import Topology, feature_map_elements, parameter_count, receptive_field, stage_shapes


def tiny(kernel0: tuple[int, int] = (3, 3)) -> Topology:
    """2 stages, 4 and 8 features, 2D, stride 2 into the bottleneck."""
    return Topology(
        dim=2,
        features_per_stage=(4, 8),
        kernel_sizes=(kernel0, (3, 3)),
        strides=((1, 1), (2, 2)),
        convs_per_stage=(2, 2),
        convs_per_decoder_stage=(2,),
    )


def test_feature_map_elements_by_hand() -> None:
    # patch 8x8, 3 classes. Encoder: 2 convs x 4 ch x 64 + 2 convs x 8 ch x 16 = 512 + 256.
    # Decoder level 0: transposed conv 4 x 64 + 2 convs x 4 x 64 = 256 + 512. Head: 3 x 64 = 192.
    assert feature_map_elements(tiny(), (8, 8), in_channels=1, num_classes=3) == 1728
    assert feature_map_elements(tiny(), (8, 8), in_channels=5, num_classes=3) == 1728  # input not counted


def test_parameter_count_by_hand() -> None:
    # conv = in*out*taps + bias(out) + norm affine(2*out)
    encoder = (1 * 4 * 9 + 12) + (4 * 4 * 9 + 12) + (4 * 8 * 9 + 24) + (8 * 8 * 9 + 24)
    transposed = 8 * 4 * 4 + 4  # kernel = stride = 2x2, with bias
    decoder = (8 * 4 * 9 + 12) + (4 * 4 * 9 + 12)  # first conv sees the 2x4 concatenated channels
    head = 4 * 3 + 3
    assert encoder + transposed + decoder + head == 1719
    assert parameter_count(tiny(), in_channels=1, num_classes=3) == 1719
    assert parameter_count(tiny(), in_channels=2, num_classes=3) == 1719 + 4 * 9


def test_receptive_field_by_hand() -> None:
    # stage 0: 3 -> 5; stage 1: +2 (stride 2 applied after) -> 7, +2*2 -> 11; decoder at jump 1: 13, 15
    assert receptive_field(tiny()) == (15, 15)
    # kernel 1 along axis 0 at stage 0 (anisotropic top): axis 0 loses the stage-0 encoder and decoder growth
    assert receptive_field(tiny(kernel0=(1, 3))) == (7, 15)


def test_stage_shapes_round_up_like_same_padding() -> None:
    assert stage_shapes(tiny(), (8, 8)) == ((8, 8), (4, 4))
    assert stage_shapes(tiny(), (9, 8)) == ((9, 8), (5, 4))


def test_unknown_architecture_and_wrong_patch_raise() -> None:
    other = Topology(2, (4, 8), ((3, 3), (3, 3)), ((1, 1), (2, 2)), (2, 2), (2,), architecture="resenc_unet")
    with pytest.raises(SettingsError):
        parameter_count(other, in_channels=1, num_classes=2)
    with pytest.raises(SettingsError):
        feature_map_elements(tiny(), (8, 8, 8), in_channels=1, num_classes=2)


def _plain(dim: int, strides: tuple[tuple[int, ...], ...], kernels: tuple[tuple[int, ...], ...]) -> Topology:
    n = len(strides)
    cap = 320 if dim == 3 else 512
    return Topology(dim, tuple(min(cap, 32 * 2**i) for i in range(n)), kernels, strides, (2,) * n, (2,) * (n - 1))


@pytest.mark.parametrize(
    ("patch", "n_stages", "classes", "nnunet_batch"),
    [((384, 256), 7, 2, 33), ((512, 512), 8, 3, 12), ((256, 224), 6, 4, 56)],  # Heart, Abd CT, ACDC (§4.10)
)
def test_elements_reproduce_nnunet_2d_batches(
    patch: tuple[int, int], n_stages: int, classes: int, nnunet_batch: int
) -> None:
    """nnU-Net's 2D batch is round(85e6 / elements x 12); our count must give its numbers."""
    topology = _plain(2, ((1, 1),) + ((2, 2),) * (n_stages - 1), ((3, 3),) * n_stages)
    elements = feature_map_elements(topology, patch, in_channels=1, num_classes=classes)
    assert round(85e6 / elements * 12) == nnunet_batch


def test_elements_reproduce_nnunet_3d_decisions() -> None:
    """Heart-like: 80x224x160 is over nnU-Net's 560e6 batch-2 limit, 64x224x160 under it;
    ACDC-like 20x256x224 gets round(560e6 / elements x 2) = 4."""
    heart = _plain(3, ((1, 1, 1),) + ((2, 2, 2),) * 4 + ((1, 2, 2),), ((3, 3, 3),) * 6)
    assert feature_map_elements(heart, (80, 224, 160), in_channels=1, num_classes=2) > 560e6
    assert feature_map_elements(heart, (64, 224, 160), in_channels=1, num_classes=2) <= 560e6
    acdc = _plain(
        3,
        ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2)),
        ((1, 3, 3),) + ((3, 3, 3),) * 5,
    )
    assert round(560e6 / feature_map_elements(acdc, (20, 256, 224), in_channels=1, num_classes=4) * 2) == 4


def test_planning_side_imports_no_torch() -> None:
    code = "import sys, autoseg.model, autoseg.planning; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
