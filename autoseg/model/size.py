"""Closed-form size of the plain U-Net of a Topology: activations, parameters, receptive field.

Pure Python (no torch), so planning can size networks without building them. The network
counted is the plain U-Net (nnU-Net's `PlainConvUNet`, see docs/planning.md):

* encoder stage s: `convs_per_stage[s]` blocks conv -> instance norm (affine) -> leaky ReLU;
  the first conv of the stage carries `strides[s]` (stage 0: stride 1), every conv of the stage
  uses `kernel_sizes[s]` with "same" padding and a bias;
* decoder level l (l = n_stages - 2 .. 0, deepest first): a transposed conv from
  `features[l + 1]` to `features[l]` channels with kernel = stride = `strides[l + 1]` and a bias,
  concatenation with the skip of encoder stage l (2 x features[l] channels), then
  `convs_per_decoder_stage[l]` conv-norm-nonlin blocks with `kernel_sizes[l]`, stride 1
  (`convs_per_decoder_stage` is indexed by resolution level, highest resolution first, like
  every other per-stage tuple of the Topology);
* a 1x1 conv segmentation head (bias) after every decoder level (deep supervision heads are
  always built, so checkpoints load with it on or off).

The upsampling step depends on `topology.upsampling` (all three are built by
`autoseg.model.unet`, and each counted here exactly):

* "transposed_conv": as above, features[l + 1] x features[l] x prod(stride) weights + features[l] bias;
* "interp_conv": a 1x1 conv features[l + 1] -> features[l] (bias) at the low resolution, then
  nearest-neighbour upsampling by the stride (the two commute, so this equals upsample-then-conv);
* "pixel_shuffle": a 1x1 conv features[l + 1] -> features[l] x prod(stride) (bias), then a
  voxel shuffle by the stride.

None of the three widens the receptive field (1x1 convs; each output voxel comes from exactly
one low-resolution voxel), so `receptive_field` holds for all of them. Only the plain U-Net is counted
here (the `unet` family keeps these calibrated formulas); other families, the residual encoder
("resenc_unet") included, are measured by `autoseg.model.measure`, and these functions raise
`SettingsError` for them.

Spatial sizes after a strided conv are ceil(n / stride), which is what a "same"-padded conv
outputs; for patches divisible by `topology.total_stride` (all planned patches) this equals
nnU-Net's floor division exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from autoseg.errors import SettingsError
from autoseg.model.contract import Topology

#: Architectures whose sizes this module knows.
COUNTED_ARCHITECTURES = ("plain_unet",)
#: Upsampling variants whose sizes this module knows.
COUNTED_UPSAMPLING = ("transposed_conv", "interp_conv", "pixel_shuffle")


def stage_shapes(topology: Topology, patch: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Spatial feature-map shape of every encoder stage (after its stride), highest resolution first."""
    _check(topology, patch)
    shapes = []
    current = tuple(int(p) for p in patch)
    for stride in topology.strides:
        current = tuple(-(-c // s) for c, s in zip(current, stride))
        shapes.append(current)
    return tuple(shapes)


def feature_map_elements(
    topology: Topology, patch: Sequence[int], *, in_channels: int, num_classes: int
) -> int:
    """Activation elements for batch size 1, counted like nnU-Net's VRAM proxy.

    Counted (each as channels x spatial voxels of that output): every encoder conv output;
    per decoder level its upsampling output(s) and each of its conv outputs; the
    segmentation head output at the highest resolution only (nnU-Net counts with deep
    supervision off). Not counted: the input, norm and nonlinearity outputs, the skip
    concatenation, the lower-resolution heads. `in_channels` does not change the count (the
    input is not counted); it is accepted so all three size functions share one signature.
    Multiply by the batch size for a batch. `patch` is in array order (z, y, x) or (y, x).
    """
    del in_channels
    shapes = stage_shapes(topology, patch)
    feats = topology.features_per_stage
    total = 0
    for s, shape in enumerate(shapes):
        total += topology.convs_per_stage[s] * feats[s] * math.prod(shape)
    for level in range(topology.n_stages - 2, -1, -1):
        voxels = math.prod(shapes[level])
        convs = topology.convs_per_decoder_stage[level]
        total += convs * feats[level] * voxels
        low, taps = math.prod(shapes[level + 1]), math.prod(topology.strides[level + 1])
        total += _upsampling_elements(topology.upsampling, feats[level], voxels, low_voxels=low, taps=taps)
    total += num_classes * math.prod(shapes[0])
    return total


def parameter_count(topology: Topology, *, in_channels: int, num_classes: int) -> int:
    """Trainable parameters of the plain U-Net: conv weights and biases, norm scale and shift,
    the upsampling layers (see the module docstring) and a 1x1 head (bias) at every decoder level."""
    _check(topology, None)
    feats = topology.features_per_stage
    total = 0
    channels = in_channels
    for s in range(topology.n_stages):
        taps = math.prod(topology.kernel_sizes[s])
        for _ in range(topology.convs_per_stage[s]):
            total += _conv_block(channels, feats[s], taps)
            channels = feats[s]
    for level in range(topology.n_stages - 2, -1, -1):
        up_taps = math.prod(topology.strides[level + 1])
        total += _upsampling_parameters(topology.upsampling, feats[level + 1], feats[level], up_taps)
        taps = math.prod(topology.kernel_sizes[level])
        channels = 2 * feats[level]
        for _ in range(topology.convs_per_decoder_stage[level]):
            total += _conv_block(channels, feats[level], taps)
            channels = feats[level]
        total += feats[level] * num_classes + num_classes
    return total


def _upsampling_parameters(kind: str, c_in: int, c_out: int, taps: int) -> int:
    """Weights and biases of one upsampling step; `taps` = prod(stride)."""
    if kind == "interp_conv":
        return c_in * c_out + c_out
    if kind == "pixel_shuffle":
        return c_in * c_out * taps + c_out * taps
    return c_in * c_out * taps + c_out


def _upsampling_elements(kind: str, c_out: int, voxels: int, *, low_voxels: int, taps: int) -> int:
    """Activation elements one upsampling step writes: the layer outputs, as for the convs.

    transposed_conv: its output; interp_conv: the low-resolution 1x1 projection and the
    upsampled copy; pixel_shuffle: the sub-pixel conv output (c_out x taps channels at the low
    resolution) and the shuffled copy. `taps` = prod(stride).
    """
    if kind == "interp_conv":
        return c_out * (low_voxels + voxels)
    if kind == "pixel_shuffle":
        return c_out * (taps * low_voxels + voxels)
    return c_out * voxels


def _conv_block(c_in: int, c_out: int, taps: int) -> int:
    """Conv weights + bias + instance-norm affine (scale and shift)."""
    return c_in * c_out * taps + c_out + 2 * c_out


def receptive_field(topology: Topology) -> tuple[int, ...]:
    """Receptive field in input voxels per axis of one output voxel of the full-resolution head.

    Follows the deepest path: every encoder conv down to the bottleneck, then every decoder conv
    back up. A conv with kernel k adds (k - 1) x jump, where jump is the product of the strides
    applied before it; a transposed conv with kernel = stride maps each output voxel to one input
    voxel, so it adds nothing and divides the jump. Axis order as the topology's.

    The exact field of one output voxel depends on its position modulo the total stride, since
    each upsampling maps a whole stride block onto one low-resolution voxel: for the 4-stage 3D
    plan (kernels 3, strides 2) it is 71 or 79 voxels, and this value, 75, is their mean. That
    mean property holds when every strided axis has stride 2 and kernel 3 at its stage (what
    planning emits), not in general (e.g. stride 3 or kernel 1 on a strided axis); the nonzero
    gradient extent is checked against it in tests/test_network.py.
    """
    _check(topology, None)
    field = [1] * topology.dim
    jump = [1] * topology.dim
    for s in range(topology.n_stages):
        kernel, stride = topology.kernel_sizes[s], topology.strides[s]
        for conv in range(topology.convs_per_stage[s]):
            field = [f + (k - 1) * j for f, k, j in zip(field, kernel, jump)]
            if conv == 0:
                jump = [j * st for j, st in zip(jump, stride)]
    for level in range(topology.n_stages - 2, -1, -1):
        jump = [j // st for j, st in zip(jump, topology.strides[level + 1])]
        kernel = topology.kernel_sizes[level]
        for _ in range(topology.convs_per_decoder_stage[level]):
            field = [f + (k - 1) * j for f, k, j in zip(field, kernel, jump)]
    return tuple(field)


def _check(topology: Topology, patch: Sequence[int] | None) -> None:
    if topology.architecture not in COUNTED_ARCHITECTURES:
        raise SettingsError(
            f"no size formulas for architecture {topology.architecture!r}",
            hint=f"size formulas exist for: {', '.join(COUNTED_ARCHITECTURES)}",
        )
    if topology.upsampling not in COUNTED_UPSAMPLING:
        raise SettingsError(
            f"no size formulas for upsampling {topology.upsampling!r}",
            hint=f"size formulas exist for: {', '.join(COUNTED_UPSAMPLING)}",
        )
    if patch is not None and len(patch) != topology.dim:
        raise SettingsError(
            f"patch {tuple(patch)} has {len(patch)} axes, the topology is {topology.dim}D",
            hint="give one patch edge per spatial axis, in array order",
        )
