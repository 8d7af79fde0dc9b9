"""`unet`: nnU-Net's plain U-Net (Ronneberger et al. 2015, 3D: Cicek et al. 2016), the default family.

The idea it carries: an encoder that halves the resolution stage by stage and a decoder that doubles it
back, concatenating at each level the encoder's feature map of that resolution (the skip), so that the
output combines context from the bottleneck with the detail of the early stages. Kernels, strides and
features come unchanged from the planner's stage plan (2 convs per stage, deep supervision).

Its sizes stay on the calibrated closed-form formulas of `autoseg.model.size` (nnU-Net's decisions are
reproduced with them; the generic estimator gives the same numbers, tests/test_families.py), which keeps
planning the default plans free of torch.
"""

from __future__ import annotations

from typing import Any

from autoseg.model import size
from autoseg.model.contract import Topology
from autoseg.model.families import NetworkFamily, SizeFormulas, register
from autoseg.model.receptive import Layer


def build(topology: Topology, in_channels: int, num_classes: int) -> Any:
    from autoseg.model.unet import UNet

    return UNet(topology, in_channels, num_classes)


def encoder_path(topology: Topology) -> list[Layer]:
    """Every encoder conv, the first of each stage carrying the stage's stride."""
    return [Layer(topology.kernel_sizes[s], stride=topology.strides[s] if conv == 0 else None)
            for s in range(topology.n_stages) for conv in range(topology.convs_per_stage[s])]


def decoder_path(topology: Topology) -> list[Layer]:
    """Per decoder level, deepest first: the upsampling (kernel = stride) folded into the first conv."""
    layers = []
    for level in range(topology.n_stages - 2, -1, -1):
        for conv in range(topology.convs_per_decoder_stage[level]):
            up = topology.strides[level + 1] if conv == 0 else None
            layers.append(Layer(topology.kernel_sizes[level], upsample=up))
    return layers


FAMILY = register(NetworkFamily(
    name="unet",
    description="U-Net: conv encoder, transposed-conv decoder, concatenated skips, deep supervision (nnU-Net)",
    build=build,
    topology=lambda stage_plan: stage_plan,
    path=lambda topology: encoder_path(topology) + decoder_path(topology),
    architecture="plain_unet",
    formulas=SizeFormulas(parameters=size.parameter_count, elements=size.feature_map_elements),
))
