"""`fcn`: the fully convolutional network, FCN-8s (Long, Shelhamer and Darrell 2015).

The idea it carries: a classification-style conv encoder becomes a dense predictor once every layer is a
convolution. A 1x1 conv ("score") turns the features of each of the last three stages into class scores;
the coarsest scores are upsampled by a learned transposed conv initialised to (bi/tri)linear
interpolation and summed with the next finer scores, twice (the "skip" of FCN: coarse semantics plus
finer "where"), and one last learned upsampling brings the fused scores to the input resolution. There
is no decoder with convs: the output is as sharp as the finest fused stage allows.

How the planner's stage plan maps to it (the torch module is `autoseg.model.fcn_net.FCN`):

* encoder: the plan's stages unchanged (kernels, strides, features, 2 convs each: nnU-Net's plain
  encoder, `autoseg.model.unet.PlainEncoder`);
* fused stages: the last three (fewer plans fuse all their stages); the upsampling from stage s to
  stage s - 1 has the plan's stride of stage s per axis, the final one the cumulative stride of the finest
  fused stage, so anisotropic plans get anisotropic kernels (`upsampling_kernel`);
* a single output (no decoder levels: `deep_supervision=False`); `output_heads` is the final upsampling,
  whose bias is added once to every output voxel, so the prior init sets the output's class prior exactly
  (the score convs' biases start at 0 and reach the output summed and interpolated).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from autoseg.model.contract import Topology
from autoseg.model.families import NetworkFamily, register
from autoseg.model.networks.unet import encoder_path
from autoseg.model.receptive import Layer

#: FCN-8s fuses the score maps of this many stages (pool3, pool4 and conv7 in the paper's VGG).
FUSED_STAGES = 3


def build(topology: Topology, in_channels: int, num_classes: int) -> Any:
    from autoseg.model.fcn_net import FCN

    return FCN(topology, in_channels, num_classes)


def topology(stage_plan: Topology) -> Topology:
    """The plan's encoder as is; no decoder convs."""
    return replace(stage_plan, convs_per_decoder_stage=(0,) * (stage_plan.n_stages - 1))


def fused_stages(topology: Topology) -> list[int]:
    """Indices of the stages whose score maps are fused, finest first."""
    return list(range(max(0, topology.n_stages - FUSED_STAGES), topology.n_stages))


def cumulative_stride(topology: Topology, stage: int) -> tuple[int, ...]:
    """Product of the strides of stages 0..stage per axis: input voxels per voxel of that stage."""
    return tuple(math.prod(s[a] for s in topology.strides[: stage + 1]) for a in range(topology.dim))


def upsampling_factors(topology: Topology) -> list[tuple[int, ...]]:
    """Factors of the upsamplings in the order they run: stage s -> s - 1 for the fused stages from the
    deepest up (the plan's stride of stage s), then the finest fused stage -> the input resolution."""
    stages = fused_stages(topology)
    inner = [tuple(topology.strides[s]) for s in reversed(stages[1:])]
    return inner + [cumulative_stride(topology, stages[0])]


def upsampling_kernel(factor: Sequence[int]) -> tuple[int, ...]:
    """Transposed-conv kernel per axis for an integer factor f: 2f - f % 2 (FCN's bilinear kernels: 4 for 2x,
    16 for 8x; 1 for 1x), with padding f // 2 so that n voxels become exactly n * f."""
    return tuple(2 * f - f % 2 for f in factor)


def upsampling_path(factor: Sequence[int]) -> list[Layer]:
    """One upsampling for the receptive field. With kernel 2f and stride f every output voxel reads exactly
    two neighbouring input voxels along an axis with f > 1 (one where f = 1): a 2-tap kernel at the low
    resolution, then an upsampling with kernel = stride, which adds nothing."""
    taps = tuple(2 if f > 1 else 1 for f in factor)
    return [Layer(taps), Layer((1,) * len(factor), upsample=tuple(factor))]


def path(topology: Topology) -> list[Layer]:
    """Every encoder conv, the deepest score conv (1x1), then every upsampling."""
    layers = encoder_path(topology) + [Layer((1,) * topology.dim)]
    for factor in upsampling_factors(topology):
        layers += upsampling_path(factor)
    return layers


FAMILY = register(NetworkFamily(
    name="fcn",
    description="FCN-8s: conv encoder, 1x1 score maps of the last 3 stages summed after bilinear-initialised "
                "transposed convs, learned upsampling to the input; a single output (Long 2015)",
    build=build,
    topology=topology,
    path=path,
    deep_supervision=False,
    upsampling=False,
))
