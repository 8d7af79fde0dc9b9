"""`mnet`: M-Net (Fu et al. 2018), a U-Net with a multi-scale input and a side output at every decoder level.

The idea it carries: multi-scale input and output around one U-shaped network. An image pyramid (the input
average-pooled to every encoder level's resolution) enters the encoder through "legs": each pyramid level
passes a conv and is concatenated to the features max-pooled into that level, so every level sees the image
itself at its own scale, not only what the levels above passed down. At the other end every decoder level
has a side output (a 1x1 classifier, an early prediction at that scale); the side outputs are upsampled to
the input resolution and averaged into the final prediction, and each of them is supervised (the authors'
code weighs the average 0.6 and each of its four side outputs 0.1).

How the planner's stage plan maps to it (torch modules in `autoseg.model.mnet_net`):

* encoder: the paper's U-Net pools: stage s > 0 max-pools level s - 1 with kernel = stride = the plan's
  strides[s] (`segnet`'s pooling; (1, 2, 2) pools in-plane only), concatenates its leg and runs the plan's
  convs_per_stage[s] convs with kernel_sizes[s] to features[s]; stage 0 runs its convs on the input (the
  pyramid's first level is the image).
* legs at every level s > 0: the pyramid's previous level average-pooled by strides[s] (so level s is the
  input averaged over blocks of the cumulative stride), one conv-norm-nonlin with kernel_sizes[s] to
  features[s] (the original's legs are 3x3 convs as wide as their level). The original's legs stop above
  the bottleneck (three legs for five levels); the bottleneck gets one here too, so that plans of two or
  three stages keep a leg.
* decoder: `autoseg.model.unet.DecoderLevel`s unchanged (the plan's upsampling step, `--upsampling`
  honoured, concatenated skips, the plan's decoder convs); each level's 1x1 head is its side output.
* fusion: each side output is upsampled to the input resolution by nearest-neighbour repetition (the
  original repeats each decoder level's features, then applies its 1x1 head; the two commute, so the head
  runs at the level's own resolution) and the n_stages - 1 maps are averaged. The average is of logits (the
  original averages sigmoid probabilities): the loss and inference apply softmax or sigmoid to the fused
  map as to any network's.
* supervision (deep supervision on, two groups of n_stages - 1 maps, resolution l at position l): group 0
  = [fused map, side outputs of levels 1 .. n - 2 at their own resolution], group 1 = [side output of level
  0, side outputs of levels 1 .. n - 2]. Every side output is in a group at its resolution: level 0's is
  full resolution like the fused map, so it needs the second group; the coarser ones, supervised against
  the downsampled target (nnU-Net's deep supervision) instead of upsampled against the full one (the
  original's), take their position in both, so with the loss's halving weights level 1 weighs like level
  0 (Hippocampus, four stages: fused map, level 0 and level 1 one third of the loss each, level 2 none, as
  the loss ignores the lowest resolution). Without deep supervision: the fused map. `output_heads` are
  the side heads, highest resolution first: with the prior's bias on all of them the fused average starts
  at the prior too.

Receptive field (`path`): the fused map reaches as far as the level-0 side output (every coarser side
output reads a voxel that the level-0 path reads too; nearest upsampling adds nothing): the encoder's
convs and poolings (`segnet`'s encoder path), then every decoder conv. A leg reaches further than the
encoder's own path into its level where the levels above have kernel 1 on an axis (the z axis of an
anisotropic plan: a (1, 3, 3) stage 0 and a leg with a 3 x 3 x 3 kernel at level 1); `leg_excess` counts,
per axis, how much further the best path into the deepest level reaches, and `path` puts it in front as one
layer (0 for isotropic plans).
"""

from __future__ import annotations

import math
from typing import Any

from autoseg.model.contract import Topology
from autoseg.model.families import NetworkFamily, register
from autoseg.model.networks.segnet import encoder_path
from autoseg.model.networks.unet import decoder_path
from autoseg.model.receptive import Layer
from autoseg.model.receptive import receptive_field as path_field


def build(topology: Topology, in_channels: int, num_classes: int) -> Any:
    from autoseg.model.mnet_net import MNet

    return MNet(topology, in_channels, num_classes)


def cumulative_stride(topology: Topology, stage: int) -> tuple[int, ...]:
    """Product of the strides of stages 0..stage per axis: input voxels per voxel of that level."""
    return tuple(math.prod(s[a] for s in topology.strides[: stage + 1]) for a in range(topology.dim))


def leg_path(topology: Topology, stage: int) -> list[Layer]:
    """Leg `stage` up to its level: the average pooling over blocks of the cumulative stride, then its conv."""
    block = cumulative_stride(topology, stage)
    return [Layer(block, stride=block), Layer(topology.kernel_sizes[stage])]


def leg_excess(topology: Topology) -> tuple[int, ...]:
    """Per axis, how much further (input voxels) the best path into the deepest level's convs reaches than the
    encoder's own path: at each level the wider of the path from the level above and the level's leg (all
    windows are centred on the same block, so the wider one holds the other)."""
    dim, layers = topology.dim, []
    best = [0] * dim
    for s in range(1, topology.n_stages):
        before = path_field(layers, dim)
        layers += [Layer(topology.kernel_sizes[s - 1])] * topology.convs_per_stage[s - 1]
        layers.append(Layer(topology.strides[s], stride=topology.strides[s]))
        grown = [a - b for a, b in zip(path_field(layers, dim), before)]
        leg = path_field(leg_path(topology, s), dim)
        best = [max(b + g, f - 1) for b, g, f in zip(best, grown, leg)]
    return tuple(b - (f - 1) for b, f in zip(best, path_field(layers, dim)))


def path(topology: Topology) -> list[Layer]:
    """What the legs add beyond the encoder's own path (one layer, `leg_excess`), the encoder's convs and
    poolings, then every decoder conv (module docstring)."""
    return [Layer(tuple(e + 1 for e in leg_excess(topology)))] + encoder_path(topology) + decoder_path(topology)


FAMILY = register(NetworkFamily(
    name="mnet",
    description="M-Net: U-Net with max pooling, an image pyramid entering every encoder level, a side output per "
                "decoder level averaged at full resolution; side outputs supervised (Fu 2018)",
    build=build,
    topology=lambda stage_plan: stage_plan,
    path=path,
    deep_supervision=True,
    upsampling=True,
))
