"""`segnet`: SegNet (Badrinarayanan et al. 2017), an encoder-decoder whose decoder upsamples with the
encoder's max-pooling indices.

The idea it carries: the encoder downsamples by max pooling and remembers where each maximum came from
(the argmax, one index per pooled voxel); the decoder puts every value back at that position (max
unpooling, zeros elsewhere) and densifies the sparse map with convs. Boundaries come back where the encoder
found them, without learned upsampling weights and without concatenated skips: only the indices cross over
(cheap to keep, unlike the U-Net's feature maps).

How the planner's stage plan maps to it (torch modules in `autoseg.model.segnet_net`):

* encoder stage s > 0 max-pools the previous level with kernel = stride = strides[s] (anisotropic strides
  such as (1, 2, 2) pool only in-plane), then runs convs_per_stage[s] conv-norm-nonlin with kernel_sizes[s]
  and features[s]; stage 0 runs its convs on the input. Kernels, strides, features and conv counts are the
  plan's, unchanged.
* decoder level l (deepest first) unpools with the indices of the pooling from level l to l + 1, then runs
  convs_per_decoder_stage[l] convs with kernel_sizes[l]. An unpooling needs the channels of the map that
  was pooled, so, as in SegNet's mirrored decoder, the last conv of a level narrows to the next finer
  level's width (features[l - 1]; the bottleneck's last conv to features[n - 2], level 0's keeps
  features[0]).
* a 1x1 head at every decoder level: deep supervision as the U-Net's.

Receptive field (`path`): a pooling with kernel = stride widens the field by (stride - 1) x jump (any voxel
of a window can be its max) and multiplies the jump; an unpooling maps each output voxel to one pooled
voxel, so it divides the jump and adds nothing; every conv adds (k - 1) x jump. The family `deconvnet`
(`autoseg.model.networks.deconvnet`) shares the encoder and the path.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from autoseg.model.contract import Topology
from autoseg.model.families import DEFAULT_UPSAMPLING, NetworkFamily, register
from autoseg.model.receptive import Layer


def build(topology: Topology, in_channels: int, num_classes: int) -> Any:
    from autoseg.model.segnet_net import SegNet

    return SegNet(topology, in_channels, num_classes)


def encoder_path(topology: Topology) -> list[Layer]:
    """Stage 0's convs; per deeper stage its max pooling (kernel = stride) and its convs."""
    t = topology
    layers = [Layer(t.kernel_sizes[0]) for _ in range(t.convs_per_stage[0])]
    for s in range(1, t.n_stages):
        layers.append(Layer(t.strides[s], stride=t.strides[s]))
        layers += [Layer(t.kernel_sizes[s]) for _ in range(t.convs_per_stage[s])]
    return layers


def decoder_path(topology: Topology) -> list[Layer]:
    """Per decoder level, deepest first: the unpooling or learned upsampling (kernel = stride) folded into
    the level's first conv, then its other convs (1x1 heads add nothing)."""
    t = topology
    return [Layer(t.kernel_sizes[level], upsample=t.strides[level + 1] if conv == 0 else None)
            for level in range(t.n_stages - 2, -1, -1) for conv in range(t.convs_per_decoder_stage[level])]


def path(topology: Topology) -> list[Layer]:
    return encoder_path(topology) + decoder_path(topology)


FAMILY = register(NetworkFamily(
    name="segnet",
    description="SegNet: conv stages with max pooling, decoder unpools with the pooling indices, no skips, "
                "deep supervision (Badrinarayanan 2017)",
    build=build,
    topology=lambda stage_plan: replace(stage_plan, upsampling=DEFAULT_UPSAMPLING),  # unpooling, not --upsampling
    path=path,
    deep_supervision=True,
    upsampling=False,
))
