"""`wnet`: the W-Net, two U-Nets end to end: the second segments the image again, given the first one's
class probabilities (hierarchical segmentation: a cascade trained jointly).

The idea it carries: segmentation in two steps, the second conditioned on the first's result. The first
U-Net segments the image; its per-voxel softmax is concatenated to the image and the second U-Net refines
that map with the same stage plan, seeing at every voxel what the first concluded from its whole field
(the name and the two U-Nets
joined through a softmax are Xia and Kulis 2017's W-Net, whose second U-Net reconstructed the image for
unsupervised segmentation; here both U-Nets are supervised, like nnU-Net's cascade but in one network,
trained end to end, the gradient of the second's loss reaching the first through the softmax).

How the planner's stage plan maps to it (the torch module is `autoseg.model.wnet_net.WNet`, two
`autoseg.model.unet.UNet`s):

* both U-Nets take the plan's kernels, strides, conv counts and upsampling step unchanged, and half of
  its features per stage (`half_width`, at least 1): `features_per_stage` of the W-Net topology is each
  U-Net's. Why halve: activation memory, the budget's dominant term, grows linearly with the width, so two
  half-width U-Nets hold about the activations of one full U-Net, and the planner (which measures the
  whole W-Net with the generic estimator) gives the pair the U-Net's patch and batch under the same
  budget; the parameters grow with the square of the width, so the pair has about half of one U-Net's.
  Without halving the pair would get a smaller patch (less context) wherever memory limits it (abdominal
  CT 3d_fullres: 48x128x160, half the U-Net's voxels, with 61 M parameters; halved: the U-Net's
  64x160x192 at batch 2, 15.6 M), and comparing it with the U-Net would mix the cascade's effect with a
  patch change. The issue's "the planner halves what one U-Net would get" is this: each U-Net gets half.
* the second U-Net's input: the image's channels plus num_classes probabilities (a sigmoid when there is a
  single output channel, whose softmax would be the constant 1).
* deep supervision on both U-Nets: with it on, the second U-Net's n_stages - 1 maps, then the first's (two
  supervision groups, the final prediction's first); `output_heads` lists the second U-Net's heads, then
  the first's, so the prior init starts the final output and the probabilities fed to the second U-Net at
  the class prior.

Receptive field (`path`): an output voxel of the second U-Net reads a window of the first U-Net's outputs,
each of which reads a window of the image (the softmax is per voxel and adds nothing; the image fed to the
second U-Net directly only shortens paths). The formula over the first U-Net's layers followed by the
second's (2F - 1 for a U-Net field F) is not the measured field here: a U-Net's window depends on the
output's position modulo the total stride (its deep voxels are shared by a block of outputs), and where the
second U-Net's window ends within such a block of the first changes what the first adds (2D plan with
strides 1, 2, 2: 71 voxels, not 69; Hippocampus: 147, not 149). `composed_field` follows the window through
both U-Nets' layers position by position (`window`) and averages its extent over one total-stride period, as
the gradient measurement does; `path` is the first U-Net's deepest path followed by the second U-Net as one
layer that adds exactly the rest, so that the formula gives that field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from autoseg.model.contract import Topology
from autoseg.model.families import NetworkFamily, register
from autoseg.model.networks.unet import decoder_path, encoder_path
from autoseg.model.receptive import Layer
from autoseg.model.receptive import receptive_field as path_field

#: Topology.architecture of a W-Net (the registry key).
ARCHITECTURE = "wnet"


def build(topology: Topology, in_channels: int, num_classes: int) -> Any:
    from autoseg.model.wnet_net import WNet

    return WNet(topology, in_channels, num_classes)


def half_width(features: tuple[int, ...]) -> tuple[int, ...]:
    """Each U-Net's features per stage: half the plan's, at least 1."""
    return tuple(max(1, f // 2) for f in features)


def topology(stage_plan: Topology) -> Topology:
    """The stage plan with half its features (each U-Net's); a W-Net topology is returned unchanged, so
    planning it again does not halve twice."""
    if stage_plan.architecture == ARCHITECTURE:
        return stage_plan
    return replace(stage_plan, features_per_stage=half_width(stage_plan.features_per_stage))


def unet_path(topology: Topology) -> list[Layer]:
    """One U-Net's deepest path: every encoder conv, then every decoder conv (upsampling adds nothing)."""
    return encoder_path(topology) + decoder_path(topology)


def window(layers: Sequence[Layer], position: Sequence[int]) -> tuple[list[int], list[int]]:
    """(first, last) input voxel per axis that the output voxel at `position` reads through `layers`.

    Followed back layer by layer as the U-Net computes: a layer's output o is its kernel centred at
    stride x o of its (upsampled) input (odd kernels, same padding), and an upsampling by u (kernel = stride)
    gives voxel q the value of its input voxel floor(q / u)."""
    first, last = list(position), list(position)
    ones = (1,) * len(position)
    for layer in reversed(layers):
        for axis in range(len(position)):
            stride, up = (layer.stride or ones)[axis], (layer.upsample or ones)[axis]
            half = (layer.dilation or ones)[axis] * (layer.kernel[axis] // 2)
            first[axis] = (stride * first[axis] - half) // up
            last[axis] = (stride * last[axis] + half) // up
    return first, last


def composed_field(topology: Topology) -> tuple[int, ...]:
    """The W-Net's receptive field per axis: the extent of `window` through the first U-Net's layers then the
    second's, averaged over the output positions of one total-stride period (rounded to a voxel)."""
    layers, field = unet_path(topology) * 2, []
    for axis, period in enumerate(topology.total_stride):
        extents = []
        for phase in range(period):
            position = [0] * topology.dim
            position[axis] = phase
            first, last = window(layers, position)
            extents.append(last[axis] - first[axis] + 1)
        field.append(round(sum(extents) / period))
    return tuple(field)


def path(topology: Topology) -> list[Layer]:
    """The first U-Net's deepest path, then the second U-Net as one layer adding the rest of `composed_field`
    (module docstring: the formula over both paths in sequence misses how their windows align)."""
    first = unet_path(topology)
    single = path_field(first, topology.dim)
    return first + [Layer(tuple(w - f + 1 for w, f in zip(composed_field(topology), single)))]


FAMILY = register(NetworkFamily(
    name="wnet",
    description="W-Net: two half-width U-Nets end to end, the second refines from the image and the first's "
                "softmax; deep supervision on both (a jointly trained cascade)",
    build=build,
    topology=topology,
    path=path,
    deep_supervision=True,
    upsampling=True,
    architecture=ARCHITECTURE,
))
