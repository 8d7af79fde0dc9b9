"""RefineNet of a Topology (family `refinenet`, `autoseg.model.networks.refinenet` documents the mapping).

Tensors are (b, c, z, y, x) in 3D and (b, c, y, x) in 2D; kernels, strides and windows per axis in array
order. Level l is the resolution of encoder stage l (level 0 = input). The encoder is ResEnc's; block l
refines level l and owns the 1x1 head of decoder level l (l < n - 1; the deepest block has none).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from autoseg.model.blocks import NONLINS, ConvNormAct, conv_op
from autoseg.model.checks import check_input, check_topology
from autoseg.model.contract import Topology
from autoseg.model.deeplab_net import upsampling
from autoseg.model.networks.refinenet import CRP_BLOCKS, block_rcus, pool_window, refine_widths
from autoseg.model.unet import ResidualEncoder, init_weights

Ints = Sequence[int]


def nonlinearity(topology: Topology, channels: int) -> nn.Module:
    """topology.nonlin, never in place: the pre-activation units still need their input for the shortcut."""
    module = NONLINS.get(topology.nonlin)(channels)
    if hasattr(module, "inplace"):
        module.inplace = False
    return module


def conv_norm(topology: Topology, in_channels: int, out_channels: int, kernel: Ints) -> ConvNormAct:
    """conv -> norm, no nonlinearity (RefineNet's units place theirs before the conv)."""
    return ConvNormAct(in_channels, out_channels, kernel, dim=topology.dim, norm=topology.norm,
                       nonlin=topology.nonlin, act=False)


class RCU(nn.Module):
    """Residual conv unit: x + conv-norm(nonlin(conv-norm(nonlin(x)))), (b, c, *n) -> (b, c, *n)."""

    def __init__(self, topology: Topology, channels: int, kernel: Ints) -> None:
        super().__init__()
        self.branch = nn.Sequential(nonlinearity(topology, channels), conv_norm(topology, channels, channels, kernel),
                                    nonlinearity(topology, channels), conv_norm(topology, channels, channels, kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)

    def zero_init_last_norm(self) -> None:
        """Start as the identity (the branch outputs 0), as ResEnc's blocks do."""
        norm = self.branch[-1].norm
        if getattr(norm, "weight", None) is not None:
            nn.init.zeros_(norm.weight)
            nn.init.zeros_(norm.bias)


class InputPath(nn.Module):
    """One input path of a block: a 1x1 conv-norm where the width changes, then `n_rcus` RCUs at the level's
    kernel. (b, c_in, *n) -> (b, width, *n)."""

    def __init__(self, topology: Topology, in_channels: int, width: int, kernel: Ints, n_rcus: int) -> None:
        super().__init__()
        ones = (1,) * topology.dim
        self.adapt = conv_norm(topology, in_channels, width, ones) if in_channels != width else nn.Identity()
        self.rcus = nn.Sequential(*(RCU(topology, width, kernel) for _ in range(n_rcus)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rcus(self.adapt(x))


class SamePool(nn.Module):
    """Max pooling with stride 1 that keeps the size: (b, c, *n) -> (b, c, *n). The input is first padded by
    window // 2 per axis with copies of its edge voxels, then pooled without padding: the same values as
    padding with -inf (a window reaching past an edge holds that edge voxel), on maps smaller than the window
    too (a 4-voxel deepest map, window 5), where torch's average pooling, used by the gradient measurement
    of the receptive field (tests/model_builders.py), rejects a padded window larger than the map."""

    def __init__(self, window: Ints, *, dim: int) -> None:
        super().__init__()
        # F.pad takes (before, after) pairs from the last axis back
        self.padding = tuple(p for w in reversed(tuple(window)) for p in (w // 2, w // 2))
        self.pool = (nn.MaxPool3d if dim == 3 else nn.MaxPool2d)(tuple(window), stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.pad(x, self.padding, mode="replicate"))


class ChainedResidualPooling(nn.Module):
    """nonlin, then CRP_BLOCKS blocks (`SamePool` of `pool_window(kernel)`; conv-norm), each reading the
    previous block's output; returns the input plus every block's output. (b, c, *n) -> (b, c, *n)."""

    def __init__(self, topology: Topology, channels: int, kernel: Ints) -> None:
        super().__init__()
        window = pool_window(kernel)
        self.act = nonlinearity(topology, channels)
        self.blocks = nn.ModuleList(
            nn.Sequential(SamePool(window, dim=topology.dim), conv_norm(topology, channels, channels, kernel))
            for _ in range(CRP_BLOCKS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = total = self.act(x)
        for block in self.blocks:
            x = block(x)
            total = total + x
        return total


class RefineBlock(nn.Module):
    """RefineNet block of `level`: RCUs per input path, fusion (conv-norm per path to the level's width, the
    coarser one upsampled by strides[level + 1] after its conv, summed), CRP, output RCU.

    forward(features (b, features[level], *n)[, coarser (b, width[level + 1], *(n / strides[level + 1]))])
    -> (b, width[level], *n); the deepest block has no coarser input and no fusion.
    """

    def __init__(self, topology: Topology, level: int) -> None:
        super().__init__()
        widths, kernels = refine_widths(topology), topology.kernel_sizes
        width, kernel, rcus = widths[level], kernels[level], block_rcus(topology, level)
        self.path = InputPath(topology, topology.features_per_stage[level], width, kernel, rcus)
        self.coarser = None
        if level < topology.n_stages - 1:
            coarse, coarse_kernel = widths[level + 1], kernels[level + 1]
            self.coarser = InputPath(topology, coarse, coarse, coarse_kernel, rcus)
            self.fuse = conv_norm(topology, width, width, kernel)
            self.fuse_coarser = conv_norm(topology, coarse, width, coarse_kernel)
            self.up = upsampling(topology.strides[level + 1], topology.dim)
        self.crp = ChainedResidualPooling(topology, width, kernel)
        self.out = RCU(topology, width, kernel)

    def forward(self, features: torch.Tensor, coarser: torch.Tensor | None = None) -> torch.Tensor:
        x = self.path(features)
        if self.coarser is not None:
            x = self.fuse(x) + self.up(self.fuse_coarser(self.coarser(coarser)))
        return self.out(self.crp(x))


class RefineNet(nn.Module):
    """RefineNet from a Topology. forward: (b, in_channels, *patch) -> logits (b, num_classes, *patch), or with
    `deep_supervision` True a list of n_stages - 1 maps, highest resolution first, map l of shape
    patch / (cumulative stride of stages 0..l). The patch must be divisible by `topology.total_stride`."""

    def __init__(self, topology: Topology, in_channels: int, num_classes: int) -> None:
        super().__init__()
        check_topology(topology, in_channels=in_channels, num_classes=num_classes, family="RefineNet",
                       min_stages=2)
        self.topology, self.in_channels, self.num_classes = topology, in_channels, num_classes
        self.deep_supervision = topology.deep_supervision
        self.encoder = ResidualEncoder(topology, in_channels)
        self.blocks = nn.ModuleList(RefineBlock(topology, level) for level in range(topology.n_stages))
        widths = refine_widths(topology)
        #: The 1x1 heads of the decoder levels (blocks 0 .. n - 2), highest resolution first.
        self.output_heads = nn.ModuleList(conv_op(topology.dim)(widths[level], num_classes, 1, bias=True)
                                          for level in range(topology.n_stages - 1))
        init_weights(self)
        for module in self.modules():
            if isinstance(module, RCU):
                module.zero_init_last_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_input(x, dim=self.topology.dim, in_channels=self.in_channels, stride=self.topology.total_stride)
        skips = self.encoder(x)
        refined = self.blocks[-1](skips[-1])
        outputs = []
        for level in range(len(self.blocks) - 2, -1, -1):
            refined = self.blocks[level](skips[level], refined)
            if self.deep_supervision or level == 0:
                outputs.append(self.output_heads[level](refined))
        return outputs[::-1] if self.deep_supervision else outputs[0]
