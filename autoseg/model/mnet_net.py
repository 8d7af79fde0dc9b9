"""The M-Net of a Topology (family `mnet`, `autoseg.model.networks.mnet` documents the mapping): a pooling
U-Net whose encoder levels also take the input image at their scale (legs) and whose decoder levels each
give a side output, averaged at full resolution into the prediction.

Tensors are (b, c, z, y, x) in 3D and (b, c, y, x) in 2D. Encoder stage s works at resolution level s
(level 0 = the input), decoder level l at level l (`autoseg.model.unet.DecoderLevel`, whose 1x1 head is the
side output of level l). The image pyramid is pooled level by level: average pooling by strides[s] of
level s - 1 (windows tile the map: the patch is divisible by the total stride), so level s is the input
averaged over blocks of the cumulative stride.
"""

from __future__ import annotations

import torch
from torch import nn

from autoseg.model.blocks import ConvNormAct, ConvStack, avg_pool_op
from autoseg.model.checks import check_input, check_topology
from autoseg.model.contract import Topology
from autoseg.model.networks.mnet import cumulative_stride
from autoseg.model.segnet_net import max_pool
from autoseg.model.unet import DecoderLevel, init_weights


class PyramidStage(nn.Module):
    """Encoder stage s > 0: max-pool level s - 1 by strides[s], concatenate the leg (the image pyramid's
    level s through a conv to features[s]), then the stage's convs to features[s].

    forward(features (b, features[s - 1], *n), image (b, c_in, *n)) -> (features (b, features[s], *n / stride),
    image (b, c_in, *n / stride)): the stage's output and the pyramid's level s.
    """

    def __init__(self, topology: Topology, stage: int, in_channels: int) -> None:
        super().__init__()
        t, s = topology, stage
        ops = {"dim": t.dim, "norm": t.norm, "nonlin": t.nonlin}
        features, above = t.features_per_stage[s], t.features_per_stage[s - 1]
        self.pool = max_pool(t.dim, t.strides[s], indices=False)
        self.pyramid = avg_pool_op(t.dim)(kernel_size=tuple(t.strides[s]), stride=tuple(t.strides[s]))
        self.leg = ConvNormAct(in_channels, features, t.kernel_sizes[s], **ops)
        self.convs = ConvStack(above + features, features, t.kernel_sizes[s], n_convs=t.convs_per_stage[s], **ops)

    def forward(self, features: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.pyramid(image)
        return self.convs(torch.cat((self.pool(features), self.leg(image)), dim=1)), image


class MNet(nn.Module):
    """M-Net from a Topology. forward: (b, in_channels, *patch) -> the fused logits (b, num_classes, *patch);
    with `deep_supervision` True (settable) a list of 2 (n_stages - 1) maps: [fused, side outputs of levels
    1 .. n - 2], then [side output of level 0, side outputs of levels 1 .. n - 2], map l of each group of shape
    patch / (cumulative stride of stages 0..l). The patch must be divisible by `topology.total_stride`.
    """

    def __init__(self, topology: Topology, in_channels: int, num_classes: int) -> None:
        super().__init__()
        check_topology(topology, in_channels=in_channels, num_classes=num_classes, family="M-Net", min_stages=2)
        t = self.topology = topology
        self.in_channels, self.num_classes = in_channels, num_classes
        self.deep_supervision = topology.deep_supervision
        self.stem = ConvStack(in_channels, t.features_per_stage[0], t.kernel_sizes[0], n_convs=t.convs_per_stage[0],
                              dim=t.dim, norm=t.norm, nonlin=t.nonlin)
        self.encoder = nn.ModuleList(PyramidStage(t, s, in_channels) for s in range(1, t.n_stages))
        self.decoder = nn.ModuleList(DecoderLevel(t, level, num_classes=num_classes) for level in range(t.n_stages - 1))
        # side output l -> full resolution: nearest repetition by level l's cumulative stride (level 0: none)
        self.to_full = nn.ModuleList(
            nn.Upsample(scale_factor=tuple(float(f) for f in cumulative_stride(t, level)), mode="nearest-exact")
            if level else nn.Identity() for level in range(t.n_stages - 1))
        init_weights(self)

    @property
    def output_heads(self) -> list[nn.Module]:
        """The side outputs' 1x1 heads, highest resolution first (the fused map is their average)."""
        return [level.head for level in self.decoder]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_input(x, dim=self.topology.dim, in_channels=self.in_channels, stride=self.topology.total_stride)
        skips, image = [self.stem(x)], x
        for stage in self.encoder:
            features, image = stage(skips[-1], image)
            skips.append(features)
        features, sides = skips[-1], []
        for level in range(len(self.decoder) - 1, -1, -1):
            features = self.decoder[level](features, skips[level])
            sides.append(self.decoder[level].head(features))
        sides.reverse()
        fused = torch.stack([up(side) for up, side in zip(self.to_full, sides)]).mean(dim=0)
        if not self.deep_supervision:
            return fused
        return [fused, *sides[1:], *sides]
