"""`refinenet`: RefineNet (Lin, Milan, Shen and Reid 2017), multi-path refinement of a residual encoder.

The idea it carries: every resolution the encoder passes through feeds the decoder, not only through a skip
but through its own refinement. A RefineNet block at level l takes the encoder's features of level l and the
output of the coarser block (level l + 1) and runs four steps, all with identity shortcuts:

1. residual conv units (RCU: nonlin-conv-nonlin-conv plus the input; the paper's ResNet unit without
   batch norm, here with `topology.norm` after each conv), `RCUS_PER_PATH` on each input path;
2. multi-resolution fusion: one conv per path to the level's width, the coarser path (bi/tri)linearly
   upsampled to level l after its conv, the two summed (linear, no nonlinearity);
3. chained residual pooling (CRP): one nonlinearity, then a chain of `CRP_BLOCKS` (max pooling, stride 1,
   "same" padding, then a conv) blocks, each block reading the previous block's output and adding its own
   output to a running sum that starts at the block's input: context from growing windows;
4. one output RCU.

How the planner's stage plan maps to it (torch modules in `autoseg.model.refinenet_net`):

* encoder: ResEnc's (`autoseg.model.unet.ResidualEncoder`: stem, then (1, 3, 4, 6, 6, ...) BasicBlocks per
  stage) on the plan's kernels, strides and features;
* blocks: one per stage, from the deepest up. The deepest (the paper's RefineNet-4) has a single input
  path, so no fusion; the blocks of levels n - 2 .. 0 are the decoder levels, each with a 1x1 head (deep
  supervision as the U-Net: n - 1 maps, highest resolution first). `convs_per_decoder_stage[l]` is the
  number of RCUs per input path of level l's block (the deepest block uses the last entry). A path's RCUs
  and its fusion conv use the kernel of the level they run at, the CRP convs that of the block's level;
* widths (`refine_widths`): half the plan's features at every level (at least 1); encoder features enter
  a block through a 1x1 conv + norm to that width (the paper's dimension adaptation). The paper refines at
  256 channels (512 in the deepest block) on ResNet widths 256 .. 2048 from stride 4, i.e. at 1, 1/2, 1/4
  and 1/4 of the encoder; 1/2 is their middle. It also stops refining at stride 4 and interpolates the
  logits, while here the last block runs at the input resolution, with ~16 maps of its width per voxel
  against a U-Net decoder level's ~4: the half width buys back 1.6x the patch volume of the full width
  (abdominal CT 3d_fullres: 40x112x128 instead of 32x96x112) and keeps every unit of the paper;
* CRP windows (`pool_window`): the paper's 5 on every axis where the level's kernel is > 1, 1 where it is 1
  (an axis the plan does not convolve is not pooled either).

Receptive field (`path`): the deepest path runs the whole encoder, the deepest block, then per level from
n - 2 up: the coarser path's RCUs and fusion conv at level l + 1, the interpolation (2 taps at the coarse
resolution, then an upsampling that adds nothing, as `fcn.upsampling_path`), the CRP chain at level l
(each block a max pooling of the window and a conv), the output RCU and the 1x1 head. Max pooling with
stride 1 and padding widens the field by (window - 1) x jump, like a conv of that kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from autoseg.model.contract import Topology
from autoseg.model.families import NetworkFamily, register
from autoseg.model.networks.fcn import upsampling_path
from autoseg.model.networks.resenc import BLOCKS_PER_STAGE
from autoseg.model.receptive import Layer

#: RCUs on each input path of a block (the paper's 2); stored in `convs_per_decoder_stage`.
RCUS_PER_PATH = 2
#: Pooling blocks of the chained residual pooling (the paper's 2).
CRP_BLOCKS = 2
#: The paper's max-pooling window of the chained residual pooling.
POOL_WINDOW = 5
#: The refinement path's width is the plan's features at its level divided by this (module docstring).
WIDTH_DIVISOR = 2

Ints = tuple[int, ...]


def build(topology: Topology, in_channels: int, num_classes: int) -> Any:
    from autoseg.model.refinenet_net import RefineNet

    return RefineNet(topology, in_channels, num_classes)


def topology(stage_plan: Topology) -> Topology:
    """The plan's kernels, strides and features; ResEnc's blocks per stage; RCUS_PER_PATH RCUs per path."""
    n = stage_plan.n_stages
    blocks = tuple(BLOCKS_PER_STAGE[min(s, len(BLOCKS_PER_STAGE) - 1)] for s in range(n))
    return replace(stage_plan, convs_per_stage=blocks, convs_per_decoder_stage=(RCUS_PER_PATH,) * (n - 1))


def refine_widths(topology: Topology) -> list[int]:
    """Channels of the block of each level, highest resolution first: features // WIDTH_DIVISOR, at least 1."""
    return [max(1, f // WIDTH_DIVISOR) for f in topology.features_per_stage]


def block_rcus(topology: Topology, level: int) -> int:
    """RCUs per input path of the block at `level` (the deepest block: the deepest decoder level's count)."""
    counts = topology.convs_per_decoder_stage
    return counts[min(level, len(counts) - 1)] if counts else RCUS_PER_PATH


def pool_window(kernel: Sequence[int]) -> Ints:
    """CRP max-pooling window per axis: POOL_WINDOW where the level's kernel is > 1, else 1."""
    return tuple(POOL_WINDOW if k > 1 else 1 for k in kernel)


def encoder_path(topology: Topology) -> list[Layer]:
    """The stem conv, then both convs of every residual block, the first block of a stage strided."""
    layers = [Layer(topology.kernel_sizes[0])]
    for s in range(topology.n_stages):
        for block in range(topology.convs_per_stage[s]):
            layers.append(Layer(topology.kernel_sizes[s], stride=topology.strides[s] if block == 0 else None))
            layers.append(Layer(topology.kernel_sizes[s]))
    return layers


def refine_path(topology: Topology, level: int) -> list[Layer]:
    """The block at `level` after its input paths are fused: the CRP chain, then the output RCU."""
    kernel = topology.kernel_sizes[level]
    layers = []
    for _ in range(CRP_BLOCKS):
        layers += [Layer(pool_window(kernel)), Layer(kernel)]
    return layers + [Layer(kernel)] * 2


def path(topology: Topology) -> list[Layer]:
    """Encoder, the deepest block (its RCUs, CRP, output RCU), then per level from n - 2 up: the coarser
    path's RCUs and fusion conv, the interpolation, the level's CRP and output RCU; the 1x1 head."""
    n = topology.n_stages
    deepest = topology.kernel_sizes[-1]
    layers = encoder_path(topology) + [Layer(deepest)] * (2 * block_rcus(topology, n - 1))
    layers += refine_path(topology, n - 1)
    for level in range(n - 2, -1, -1):
        coarse = topology.kernel_sizes[level + 1]
        layers += [Layer(coarse)] * (2 * block_rcus(topology, level) + 1)
        layers += upsampling_path(topology.strides[level + 1])
        layers += refine_path(topology, level)
    return layers + [Layer((1,) * topology.dim)]


FAMILY = register(NetworkFamily(
    name="refinenet",
    description="RefineNet: residual encoder, one refinement block per level from the deepest up (RCUs, "
                "multi-resolution fusion with bilinear upsampling, chained residual pooling), deep "
                "supervision (Lin 2017)",
    build=build,
    topology=topology,
    path=path,
    deep_supervision=True,
    upsampling=False,
))
