"""`fullnet`: FullNet, the full resolution convolutional network (Qu et al. 2019).

The idea it carries: never downsample. Pooling buys context at the price of detail that a decoder must then
recover; FullNet keeps every feature map at the input resolution and grows its receptive field with dilated
convolutions instead. Its body is a chain of dense blocks (Huang et al. 2017): every layer of a block sees the
concatenation of the block's input and of all earlier layers' outputs and adds `growth` channels of its own;
a 1x1 transition conv compresses each block's concatenation back to the block width. The dilation grows from
block to block, so the field grows like an encoder's without losing resolution.

How the planner's stage plan maps to it (torch module `autoseg.model.fullnet_net.FullNet`):

* one dense block per plan stage, its convs with the stage's kernel (a 1 on an axis stays 1) and a dilation
  per axis equal to the plan's cumulative stride of that stage (`block_dilations`): an axis the plan has not
  pooled yet gets no dilation, so each block sees the context the U-Net's stage sees, at full resolution;
* layers per block: the U-Net's convs at that resolution, encoder plus decoder (`dense_layers`: 4 per stage
  of nnU-Net's plans, 2 in the deepest), stored in `convs_per_stage`; so the field is comparable with the
  U-Net's (Hippocampus: 91 against 75 voxels, the U-Net's strided convs act at the finer jump);
* width: a stem conv (stage 0's kernel) and every transition give the plan's first-stage features (32),
  stored in `features_per_stage`; the growth rate is half of it (16, `growth_rate`): at full resolution
  every channel costs a whole patch of activations, and the concatenations grow quadratically with the
  layers, so growth and width stay at the top stage's scale instead of the plan's 320 at depth;
* strides: the topology keeps the plan's (as `deeplab` does). Topology has no field for dilations, and
  the cumulative strides are where they come from; so `total_stride` is the plan's and planned patches are
  divisible by it, while the network itself applies no stride and takes any patch;
* a single output (`deep_supervision=False`): `output_heads` is the final 1x1 conv.

Receptive field (`path`): the stem, every dense layer at its block's dilation (the chain through all of
them is the longest path of a dense block: effective kernel a(k - 1) + 1 each), the 1x1 transitions and
the head. Memory: the generic estimator counts every conv output and every layer's concatenation (a dense
layer returns it), so the planner's patch search shrinks the patch to the budget and notes it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from autoseg.model.contract import Topology
from autoseg.model.families import NetworkFamily, register
from autoseg.model.receptive import Layer

Ints = tuple[int, ...]

#: Growth rate = block width // GROWTH_DIVISOR (16 for the planner's 32 features).
GROWTH_DIVISOR = 2


def build(topology: Topology, in_channels: int, num_classes: int) -> Any:
    from autoseg.model.fullnet_net import FullNet

    return FullNet(topology, in_channels, num_classes)


def dense_layers(stage_plan: Topology) -> Ints:
    """Layers of the dense block of each stage: the plan's encoder convs there plus its decoder convs at that
    resolution (none for the deepest stage, and none for a FullNet topology: applying the rule twice gives
    the same counts)."""
    n = stage_plan.n_stages
    decoder = tuple(stage_plan.convs_per_decoder_stage) + (0,)
    return tuple(stage_plan.convs_per_stage[s] + (decoder[s] if s < n - 1 else 0) for s in range(n))


def topology(stage_plan: Topology) -> Topology:
    """The plan's kernels and strides; the first stage's features for every block; `dense_layers`."""
    n = stage_plan.n_stages
    width = stage_plan.features_per_stage[0]
    return replace(stage_plan, features_per_stage=(width,) * n, convs_per_stage=dense_layers(stage_plan),
                   convs_per_decoder_stage=(0,) * (n - 1))


def growth_rate(topology: Topology, stage: int) -> int:
    """Channels each layer of block `stage` adds: its width // GROWTH_DIVISOR, at least 1."""
    return max(1, topology.features_per_stage[stage] // GROWTH_DIVISOR)


def block_dilations(topology: Topology) -> list[Ints]:
    """Dilation per block and axis: the plan's cumulative stride of that stage, 1 where the kernel is 1."""
    dilations = []
    for s, kernel in enumerate(topology.kernel_sizes):
        cumulative = tuple(math.prod(stride[a] for stride in topology.strides[: s + 1]) for a in range(topology.dim))
        dilations.append(tuple(d if k > 1 else 1 for d, k in zip(cumulative, kernel)))
    return dilations


def path(topology: Topology) -> list[Layer]:
    """The stem, every dense layer at its block's dilation, each block's 1x1 transition, the 1x1 head."""
    ones = (1,) * topology.dim
    layers = [Layer(topology.kernel_sizes[0])]
    for s, dilation in enumerate(block_dilations(topology)):
        layers += [Layer(topology.kernel_sizes[s], dilation=dilation)] * topology.convs_per_stage[s]
        layers.append(Layer(ones))
    return layers + [Layer(ones)]


FAMILY = register(NetworkFamily(
    name="fullnet",
    description="FullNet: no downsampling; dense blocks (growth rate half the top width) dilated by the plan's "
                "cumulative stride per stage, 1x1 transitions; a single full-resolution output (Qu 2019)",
    build=build,
    topology=topology,
    path=path,
    deep_supervision=False,
    upsampling=False,
))
