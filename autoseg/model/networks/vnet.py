"""`vnet`: the V-Net (Milletari et al. 2016), a fully convolutional 3D network of residual stages.

The idea it carries: every stage learns a residual function (He et al. 2016) - its convs' output is added
to the stage's input - so a deep encoder-decoder with large 5x5x5 kernels trains; downsampling is a learned
strided conv (kernel = stride) instead of pooling, upsampling a transposed conv, the nonlinearity PReLU,
and each decoder stage concatenates the encoder's features of its resolution (the skip).

How the planner's stage plan maps to it (features and strides unchanged; the torch module is
`autoseg.model.vnet_net.VNet`):

* kernels: 5 on every axis where the stage is isotropic, the plan's kernel otherwise (`vnet_kernel`).
  Topologies carry no spacing, so isotropy is read from the plan itself: nnU-Net's rules give a stage
  kernel 3 on every axis only when every axis' spacing there is within 2x of the finest, and the same
  stride on every axis only when all axes were pooled alike. Both together = isotropic (the original
  V-Net ran its 5x5x5 kernels on 1 x 1 x 1.5 mm, a ratio of 1.5). Anything else keeps the plan's kernel,
  so a (1, 3, 3) kernel of anisotropic data stays (1, 3, 3) and a kernel of 1 on an axis stays 1.
* convs per stage: the original's 1, 2, 3, 3, 3 (encoder, highest resolution first) and 3, 3, 2, 1
  (decoder, deepest first) are min(level + 1, 3) at resolution level l; more stages repeat 3, fewer
  stages keep the top of the sequence.
* nonlinearity `prelu` (stored in the topology); normalisation `topology.norm` (the original had none).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from autoseg.model.contract import Topology
from autoseg.model.families import DEFAULT_UPSAMPLING, NetworkFamily, register
from autoseg.model.receptive import Layer

#: The original's kernel edge, used on isotropic stages.
ISOTROPIC_KERNEL = 5
#: Convs per stage of the original grow 1, 2, 3 from the top level and stay at 3 below.
MAX_CONVS = 3
#: The V-Net's nonlinearity (a `Topology.nonlin` key that `autoseg.model.vnet_net` builds as nn.PReLU).
PRELU = "prelu"


def build(topology: Topology, in_channels: int, num_classes: int) -> Any:
    from autoseg.model.vnet_net import VNet

    return VNet(topology, in_channels, num_classes)


def is_isotropic(kernel: Sequence[int], stride: Sequence[int]) -> bool:
    """True for a stage the plan treats as isotropic: kernel 3 on every axis, one stride on all axes."""
    return all(k == 3 for k in kernel) and len(set(stride)) == 1


def vnet_kernel(kernel: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """The V-Net's kernel of one stage: 5 on every axis where the stage is isotropic, else the plan's."""
    return (ISOTROPIC_KERNEL,) * len(kernel) if is_isotropic(kernel, stride) else tuple(kernel)


def convs_at(level: int) -> int:
    """Convs of the encoder stage and of the decoder stage at resolution level `level` (0 = input)."""
    return min(level + 1, MAX_CONVS)


def topology(stage_plan: Topology) -> Topology:
    """The V-Net of the planner's stage plan (idempotent: a 5 is not a 3, so it stays 5)."""
    n = stage_plan.n_stages
    kernels = tuple(vnet_kernel(k, s) for k, s in zip(stage_plan.kernel_sizes, stage_plan.strides))
    return replace(stage_plan, kernel_sizes=kernels, convs_per_stage=tuple(convs_at(s) for s in range(n)),
                   convs_per_decoder_stage=tuple(convs_at(level) for level in range(n - 1)),
                   nonlin=PRELU, upsampling=DEFAULT_UPSAMPLING)


def path(topology: Topology) -> list[Layer]:
    """Stage 0's convs; per deeper stage the down conv (kernel = stride) and its convs; then per decoder
    level, deepest first, the up conv (kernel = stride, adds nothing) folded into the level's first conv."""
    t = topology
    layers = [Layer(t.kernel_sizes[0]) for _ in range(t.convs_per_stage[0])]
    for s in range(1, t.n_stages):
        layers.append(Layer(t.strides[s], stride=t.strides[s]))
        layers += [Layer(t.kernel_sizes[s]) for _ in range(t.convs_per_stage[s])]
    for level in range(t.n_stages - 2, -1, -1):
        for conv in range(t.convs_per_decoder_stage[level]):
            layers.append(Layer(t.kernel_sizes[level], upsample=t.strides[level + 1] if conv == 0 else None))
    return layers


FAMILY = register(NetworkFamily(
    name="vnet",
    description="V-Net: residual stages, 5x5x5 convs where isotropic, strided-conv down, transposed-conv up, "
                "PReLU, concatenated skips, deep supervision (Milletari 2016)",
    build=build,
    topology=topology,
    path=path,
    deep_supervision=True,
    upsampling=False,
))
