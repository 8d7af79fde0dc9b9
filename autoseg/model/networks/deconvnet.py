"""`deconvnet`: DeconvNet (Noh et al. 2015), SegNet's encoder with a decoder that learns its upsampling.

The idea it carries: upsampling is learned. Noh et al. stack "deconvolution" layers (transposed convs)
on top of a max-pooling encoder so that the decoder reconstructs the object's shape at ever finer
resolution with learned filters, instead of a single fixed interpolation of coarse scores (FCN).

What autoseg builds (torch modules in `autoseg.model.segnet_net`): the encoder of `segnet` (the plan's
stages, max pooling with kernel = stride = the stage's strides); decoder level l upsamples level l + 1 to
features[l] with a learned transposed conv of kernel = stride (`--upsampling` may pick the other learned
steps, `interp_conv` or `pixel_shuffle`), then runs convs_per_decoder_stage[l] convs with kernel_sizes[l]
(a transposed conv of stride 1 computes the same function class as a conv, so the paper's stride-1
deconvolution layers are plain convs here); no skips, no pooling indices; a 1x1 head per level, deep
supervision as the U-Net's. The paper also unpools with the pooling indices before its deconvolutions:
that part is `segnet`'s decoder, so the two families differ exactly in how they upsample (indices vs
learned weights). Receptive field: `segnet`'s rule (a learned upsampling with kernel = stride adds nothing).
"""

from __future__ import annotations

from typing import Any

from autoseg.model.contract import Topology
from autoseg.model.families import NetworkFamily, register
from autoseg.model.networks.segnet import path


def build(topology: Topology, in_channels: int, num_classes: int) -> Any:
    from autoseg.model.segnet_net import DeconvNet

    return DeconvNet(topology, in_channels, num_classes)


FAMILY = register(NetworkFamily(
    name="deconvnet",
    description="DeconvNet: conv stages with max pooling, decoder upsamples with learned transposed convs, "
                "no skips, deep supervision (Noh 2015)",
    build=build,
    topology=lambda stage_plan: stage_plan,
    path=path,
    deep_supervision=True,
    upsampling=True,
))
