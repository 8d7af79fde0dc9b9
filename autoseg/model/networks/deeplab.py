"""`deeplab` and `deeplabv3plus`: DeepLabv3 (Chen et al. 2017) and its v3+ decoder (Chen et al. 2018).

The idea they carry: atrous (dilated) convolution. Once the encoder has reached its output stride it stops
striding; the later stages keep the resolution and multiply the dilation of their convs instead, so their
receptive field grows as if they had strided while the map stays dense. An ASPP head (atrous spatial
pyramid pooling) then looks at the deepest map at several rates at once: a 1x1 branch, three atrous 3x3
branches and an image-level branch (global average pooling -> 1x1 conv -> broadcast), concatenated and
projected by a 1x1 conv; a 1x1 classifier and (bi/tri)linear upsampling give the logits. `deeplabv3plus`
adds v3+'s light decoder: the ASPP output is upsampled to one low-level encoder stage, concatenated with
that stage's features reduced by a 1x1 conv, refined by two convs, classified and upsampled.

How the planner's stage plan maps to them (torch modules in `autoseg.model.deeplab_net`):

* encoder: ResEnc's residual stages (stem conv, then (1, 3, 4, 6, 6, ...) BasicBlocks per stage) on the
  plan's kernels and features. The topology keeps the plan's strides, so `total_stride` and the planned
  patch are the plan's; the builder applies them only up to OUTPUT_STRIDE per axis and turns every later
  stride into dilation of the stage it belonged to and all after it (`atrous_plan`; per axis, so an axis
  the plan pools less keeps all its strides).
* ASPP rates (`aspp_rates`): the paper's largest rate at output stride 8 is 36 (18 at 16, for 513-pixel
  crops). The planner guarantees only a deepest map of MIN_MAP_EDGE voxels per pooled axis at the plan's
  total stride T, i.e. m = 4 T / o voxels at output stride o. The largest rate is capped so that its
  dilated kernel (2 r + 1 taps) fits in m, and the three rates keep the paper's ratio 1 : 2 : 3 of it
  (rounded, at least 1); axes where the deepest kernel is 1 keep rate 1.
* a single output (`deep_supervision=False`); `output_heads` is the classifier (1x1 conv): its bias is
  the output's class prior, the final interpolation preserves constants.

Receptive field: `path` lists the deepest *local* path: stem, every block's convs at their dilation, the
largest-rate ASPP branch, the 1x1 projection and classifier and the interpolations. The image-level branch
is left out by convention: its field is the whole input for any patch, which no per-axis number states;
the network marks that branch's module `global_context = True`, and a gradient measurement of the field
must hold its output fixed (detach it) to measure what `path` describes.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from autoseg.model.contract import Topology
from autoseg.model.families import NetworkFamily, register
from autoseg.model.networks.fcn import upsampling_path
from autoseg.model.networks.resenc import BLOCKS_PER_STAGE
from autoseg.model.receptive import Layer

#: The encoder stops striding at this cumulative stride per axis (the paper's dense setting; at 16 a planned
#: 3D patch leaves a deepest map of 2-5 voxels, too small for rates to differ).
OUTPUT_STRIDE = 8
#: The paper's largest ASPP rate at output stride 8; scaled by 8 / o at output stride o (18 at 16).
PAPER_LARGEST_RATE = 36
#: The smallest deepest feature-map edge the planner leaves on a pooled axis (planning.topology's rule).
MIN_MAP_EDGE = 4
#: v3+ takes its low-level features from the last stage at this cumulative stride or finer (paper: 4).
LOW_LEVEL_STRIDE = 4
#: v3+ decoder: convs after the concatenation (the paper's two 3x3 convs).
DECODER_CONVS = 2

Ints = tuple[int, ...]


def build(topology: Topology, in_channels: int, num_classes: int) -> Any:
    from autoseg.model.deeplab_net import DeepLab

    return DeepLab(topology, in_channels, num_classes, decoder=topology.architecture == "deeplabv3plus")


def topology(stage_plan: Topology) -> Topology:
    """The plan's kernels, strides and features; ResEnc's blocks per stage; no U-Net decoder convs."""
    n = stage_plan.n_stages
    blocks = tuple(BLOCKS_PER_STAGE[min(s, len(BLOCKS_PER_STAGE) - 1)] for s in range(n))
    return replace(stage_plan, convs_per_stage=blocks, convs_per_decoder_stage=(0,) * (n - 1))


def atrous_plan(topology: Topology) -> tuple[list[Ints], list[Ints], Ints]:
    """(strides the network applies per stage, dilation of each stage's convs, output stride), per axis.

    A plan stride is applied while the cumulative stride stays <= OUTPUT_STRIDE on its axis; from the first
    one that would pass it on, the stride becomes 1 and multiplies the dilation of that stage and the later
    ones (DeepLab's rule: the field grows as with the stride, the resolution stays).
    """
    cumulative, dilation = [1] * topology.dim, [1] * topology.dim
    strides, dilations = [], []
    for plan_stride in topology.strides:
        applied = []
        for axis, s in enumerate(plan_stride):
            if cumulative[axis] * s <= OUTPUT_STRIDE and dilation[axis] == 1:
                cumulative[axis] *= s
                applied.append(s)
            else:
                dilation[axis] *= s
                applied.append(1)
        strides.append(tuple(applied))
        dilations.append(tuple(dilation))
    return strides, dilations, tuple(cumulative)


def stage_dilations(topology: Topology) -> list[Ints]:
    """Dilation per stage and axis, 1 where the stage's kernel is 1 (a 1-tap kernel has no rate)."""
    _, dilations, _ = atrous_plan(topology)
    return [tuple(d if k > 1 else 1 for d, k in zip(dil, kernel))
            for dil, kernel in zip(dilations, topology.kernel_sizes)]


def aspp_rates(topology: Topology) -> list[Ints]:
    """The three atrous branches' rates per axis (module docstring: the paper's, capped to fit the map)."""
    _, _, output = atrous_plan(topology)
    largest = []
    for total, o, kernel in zip(topology.total_stride, output, topology.kernel_sizes[-1]):
        edge = MIN_MAP_EDGE * total // o
        cap = max(1, (edge - 1) // 2)
        largest.append(min(PAPER_LARGEST_RATE * OUTPUT_STRIDE // o, cap) if kernel > 1 else 1)
    return [tuple(max(1, round(r * i / 3)) for r in largest) for i in (1, 2, 3)]


def low_level_stage(topology: Topology) -> int:
    """v3+'s skip: the last stage at cumulative stride <= LOW_LEVEL_STRIDE on every axis that is still finer
    than the output stride on some axis (stage 0 if none)."""
    strides, _, output = atrous_plan(topology)
    cumulative, best = [1] * topology.dim, 0
    for s, stride in enumerate(strides):
        cumulative = [c * x for c, x in zip(cumulative, stride)]
        if max(cumulative) <= LOW_LEVEL_STRIDE and tuple(cumulative) != output:
            best = s
    return best


def stage_stride(topology: Topology, stage: int) -> Ints:
    """Cumulative applied stride of stages 0..stage per axis."""
    strides, _, _ = atrous_plan(topology)
    return tuple(math.prod(s[a] for s in strides[: stage + 1]) for a in range(topology.dim))


def encoder_path(topology: Topology) -> list[Layer]:
    """The stem conv, then both convs of every block at the stage's dilation, the first strided."""
    strides, _, _ = atrous_plan(topology)
    layers = [Layer(topology.kernel_sizes[0])]
    for s, dilation in enumerate(stage_dilations(topology)):
        kernel = topology.kernel_sizes[s]
        for block in range(topology.convs_per_stage[s]):
            layers.append(Layer(kernel, stride=strides[s] if block == 0 else None, dilation=dilation))
            layers.append(Layer(kernel, dilation=dilation))
    return layers


def path(topology: Topology) -> list[Layer]:
    """The deepest local path (the image-level branch left out, module docstring): encoder, the largest-rate
    ASPP branch, the 1x1 projection; v3+: interpolation to the low-level stage and the decoder convs; the
    1x1 classifier and the interpolation to the input."""
    ones = (1,) * topology.dim
    _, _, output = atrous_plan(topology)
    layers = encoder_path(topology)
    layers += [Layer(topology.kernel_sizes[-1], dilation=aspp_rates(topology)[-1]), Layer(ones)]
    final = output
    if topology.architecture == "deeplabv3plus":
        skip = low_level_stage(topology)
        final = stage_stride(topology, skip)
        layers += upsampling_path(tuple(o // f for o, f in zip(output, final)))
        layers += [Layer(topology.kernel_sizes[skip])] * DECODER_CONVS
    return layers + [Layer(ones)] + upsampling_path(final)


DEEPLAB = register(NetworkFamily(
    name="deeplab",
    description="DeepLabv3: residual encoder that stops striding at output stride 8 (atrous later stages), "
                "ASPP head with image pooling, bilinear upsampling; a single output (Chen 2017)",
    build=build,
    topology=topology,
    path=path,
    deep_supervision=False,
    upsampling=False,
))

DEEPLABV3PLUS = register(NetworkFamily(
    name="deeplabv3plus",
    description="DeepLabv3+: DeepLabv3 with a light decoder joining one low-level stage (stride <= 4) before "
                "the last upsampling; a single output (Chen 2018)",
    build=build,
    topology=topology,
    path=path,
    deep_supervision=False,
    upsampling=False,
))
