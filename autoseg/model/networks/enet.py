"""`enet`: ENet (Paszke et al. 2016), a small, fast encoder-decoder built from residual bottlenecks.

The idea it carries: efficiency by design. The input is downsampled at once (the initial block: a strided
conv next to a max pooling, concatenated), almost all work happens at the lowest resolution in bottleneck
blocks (1x1 reduce to a quarter of the width, one spatial conv, 1x1 expand, added to the block's input),
context comes from dilated convs (rates 2, 4, 8, 16) and factorised asymmetric convs instead of more
downsampling, and the decoder is much smaller than the encoder: max unpooling with the encoder's pooling
indices plus a few bottlenecks. PReLU, spatial (channel) dropout; about 0.4 M parameters in 2D, well
under 1 M in 3D.

How the planner's stage plan maps to it (torch modules in `autoseg.model.enet_net`):

* resolution levels: the paper's four (input, 1/2, 1/4, 1/8), i.e. the plan's first min(n, 4) stages;
  ENet gets its context from dilation, not from more downsampling. The topology keeps those stages only,
  so its total stride (what the patch is divisible by) divides the plan's and the planned patch fits.
* the strides of the kept stages are the downsampling steps, anisotropic ones honoured: strides[1] is
  the initial block's, strides[l] the downsampling bottleneck's into level l (kernel = stride, so (1, 2, 2)
  pools in-plane only). Kernels: a step at level l uses kernel_sizes[l] (1 stays 1: a (1, 3, 3) level
  convolves in-plane only, dilates in-plane only and factorises in-plane only); a conv next to a pooling
  (the initial block's, the upsampling bottleneck's transposed conv) widens to 2 x stride - 1 where the
  plan's kernel is smaller, so that its window covers the pooling window (`covering_kernel`).
* widths: ENet's own, 16 (level 1), 64 (levels between), 128 (the deepest level), whatever the plan's
  features; `features_per_stage` stores them (level 0, which holds only the input and the logits, repeats
  16). The deepest level runs the paper's sections 2 and 3 (regular, dilated 2, asymmetric, dilated 4,
  regular, dilated 8, asymmetric, dilated 16, twice); levels between it and level 1 run a downsampling
  bottleneck and 4 regular ones (section 1); with 3 levels section 1 is left out, with 2 the deepest
  sections follow the initial block. Decoder: per level an upsampling bottleneck (unpooling with the
  indices of that level's downsampling) and 2 regular bottlenecks (1 at level 1), then a transposed conv
  (kernel = stride) from level 1 to the logits: the network's only head.
* asymmetric convs in 3D: one 1D conv of 5 taps per axis whose kernel is > 1 (5x1x1, 1x5x1, 1x1x5; the
  paper's 5x1 then 1x5 in 2D), in sequence, no nonlinearity between them.
* nonlinearity `prelu` (stored in the topology; another `Topology.nonlin` key is honoured), normalisation
  `topology.norm` (the paper's batch norm; autoseg's default instance norm), dropout 0.01 before the
  deepest level, 0.1 from its downsampling on (the paper's).
* a single output (`deep_supervision=False`): the paper's decoder has no side outputs and its levels are
  narrow (16, 64 features), so the family trains on the full-resolution output only.

Receptive field (`path`): the bottleneck branch of every block (the residual branch's window lies inside
it): the initial conv, per downsampling its conv of kernel = stride, every spatial conv at its dilation,
per upsampling bottleneck its transposed conv of kernel K and stride s, which on average reads as many
voxels as an upsampling followed by a kernel of K - s + 1 taps, and the final transposed conv (adds nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from autoseg.model.contract import Topology
from autoseg.model.families import DEFAULT_UPSAMPLING, NetworkFamily, register
from autoseg.model.receptive import Layer

#: Resolution levels ENet uses: the input and three downsamplings (1/2, 1/4, 1/8 in the paper).
MAX_LEVELS = 4
#: Widths (paper): after the initial block, of the levels between it and the deepest, of the deepest.
INITIAL_WIDTH, MIDDLE_WIDTH, DEEPEST_WIDTH = 16, 64, 128
#: The paper's sections 2 and 3 (each; section 2 starts with a downsampling bottleneck): (kind, rate).
DEEPEST_SECTION = (("regular", 1), ("dilated", 2), ("asymmetric", 1), ("dilated", 4),
                   ("regular", 1), ("dilated", 8), ("asymmetric", 1), ("dilated", 16))
#: Regular bottlenecks after a downsampling one on a level between level 1 and the deepest (section 1).
MIDDLE_BOTTLENECKS = 4
#: Taps of each 1D conv of an asymmetric bottleneck.
ASYMMETRIC_KERNEL = 5
#: Spatial dropout before the deepest level's downsampling and from it on.
DROPOUT_EARLY, DROPOUT_LATE = 0.01, 0.1
#: The ENet's nonlinearity (a `Topology.nonlin` key that `autoseg.model.enet_net` builds as nn.PReLU).
PRELU = "prelu"


@dataclass(frozen=True)
class Step:
    """One block of the ENet, in forward order: its kind, the resolution level of its output, its output
    width (the logits' for "full"), the dilation rate of a "dilated" step, its spatial dropout."""

    kind: str  # initial | down | regular | dilated | asymmetric | up | full
    level: int
    width: int
    rate: int = 1
    dropout: float = 0.0


def build(topology: Topology, in_channels: int, num_classes: int) -> Any:
    from autoseg.model.enet_net import ENet

    return ENet(topology, in_channels, num_classes)


def widths(n_levels: int) -> tuple[int, ...]:
    """features_per_stage of an ENet of `n_levels` levels (level 0 repeats the initial block's width)."""
    if n_levels <= 2:
        return (INITIAL_WIDTH, DEEPEST_WIDTH)[:n_levels]
    return (INITIAL_WIDTH, INITIAL_WIDTH) + (MIDDLE_WIDTH,) * (n_levels - 3) + (DEEPEST_WIDTH,)


def layout(topology: Topology) -> list[Step]:
    """The blocks of the ENet of `topology`, in forward order (widths from topology.features_per_stage)."""
    w, deepest = topology.features_per_stage, topology.n_stages - 1
    steps = [Step("initial", 1, w[1] if deepest > 1 else INITIAL_WIDTH)]
    for level in range(2, deepest + 1):
        dropout = DROPOUT_LATE if level == deepest else DROPOUT_EARLY
        steps.append(Step("down", level, w[level], dropout=dropout))
        if level < deepest:
            steps += [Step("regular", level, w[level], dropout=dropout)] * MIDDLE_BOTTLENECKS
    steps += [Step(kind, deepest, w[deepest], rate, DROPOUT_LATE) for kind, rate in DEEPEST_SECTION * 2]
    for level in range(deepest - 1, 0, -1):
        steps.append(Step("up", level, w[level], dropout=DROPOUT_LATE))
        steps += [Step("regular", level, w[level], dropout=DROPOUT_LATE)] * (1 if level == 1 else 2)
    return steps + [Step("full", 0, 0)]


def topology(stage_plan: Topology) -> Topology:
    """The plan's first min(n, 4) stages with ENet's widths; conv counts = blocks per level (descriptive)."""
    n = min(stage_plan.n_stages, MAX_LEVELS)
    t = replace(stage_plan, features_per_stage=widths(n), kernel_sizes=stage_plan.kernel_sizes[:n],
                strides=stage_plan.strides[:n], convs_per_stage=(0,) * n, convs_per_decoder_stage=(0,) * (n - 1),
                nonlin=PRELU, upsampling=DEFAULT_UPSAMPLING)
    encoder, decoder, decoding = [0] * n, [0] * n, False
    for step in layout(t):
        decoding = decoding or step.kind in ("up", "full")
        (decoder if decoding else encoder)[step.level] += 1
    return replace(t, convs_per_stage=tuple(encoder), convs_per_decoder_stage=tuple(decoder[: n - 1]))


def covering_kernel(kernel: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """The plan's kernel, widened to 2 s - 1 on an axis of stride s where smaller: odd, and its window
    around output voxel p (s p +- (K - 1) / 2) contains the pooling window s p .. s p + s - 1."""
    return tuple(max(k, 2 * s - 1) for k, s in zip(kernel, stride))


def dilation(kernel: tuple[int, ...], rate: int) -> tuple[int, ...]:
    """`rate` on the axes the kernel spans, 1 where it is 1."""
    return tuple(rate if k > 1 else 1 for k in kernel)


def asymmetric_kernels(kernel: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The 1D kernels of an asymmetric bottleneck: ASYMMETRIC_KERNEL taps along each axis where `kernel` > 1."""
    ones = (1,) * len(kernel)
    return [ones[:a] + (ASYMMETRIC_KERNEL,) + ones[a + 1:] for a, k in enumerate(kernel) if k > 1] or [ones]


def step_path(step: Step, topology: Topology) -> list[Layer]:
    """The layers of one step's bottleneck branch (1x1 projections add nothing and are left out)."""
    k, s = topology.kernel_sizes, topology.strides
    if step.kind == "initial":
        return [Layer(covering_kernel(k[1], s[1]), stride=s[1])]
    if step.kind == "down":
        return [Layer(s[step.level], stride=s[step.level]), Layer(k[step.level])]
    if step.kind in ("regular", "dilated"):
        return [Layer(k[step.level], dilation=dilation(k[step.level], step.rate))]
    if step.kind == "asymmetric":
        return [Layer(kernel) for kernel in asymmetric_kernels(k[step.level])]
    up = s[step.level + 1]
    if step.kind == "up":
        taps = tuple(c - u + 1 for c, u in zip(covering_kernel(k[step.level], up), up))
        return [Layer(taps, upsample=up)]
    return [Layer((1,) * topology.dim, upsample=s[1])]


def path(topology: Topology) -> list[Layer]:
    return [layer for step in layout(topology) for layer in step_path(step, topology)]


FAMILY = register(NetworkFamily(
    name="enet",
    description="ENet: initial block, residual bottlenecks (dilated, asymmetric), pooling indices reused by "
                "unpooling, PReLU, < 1 M parameters, a single output (Paszke 2016)",
    build=build,
    topology=topology,
    path=path,
    deep_supervision=False,
    upsampling=False,
))
