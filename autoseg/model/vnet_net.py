"""The V-Net of a Topology (family `vnet`, `autoseg.model.networks.vnet`): residual stages, strided-conv
downsampling, transposed-conv upsampling, PReLU, concatenated skips.

Tensors are (b, c, z, y, x) in 3D and (b, c, y, x) in 2D. Encoder stage s works at resolution level s:
stage 0 runs its convs on the input and adds the input back through a 1x1 projection (the original adds
the single-channel input replicated over its 16 channels, which a 1x1 conv generalises to any number of
input channels); stage s > 0 downsamples with a conv of kernel = stride (no overlap, no padding), then
runs its convs and adds the down conv's output back. Decoder level l upsamples level l + 1 with a
transposed conv (kernel = stride) to features[l], concatenates encoder stage l's output, maps the
concatenation back to features[l] with its convs and adds the upsampled features back (the original's
decoder convs stay at the concatenation's width 2 x features[l]; mapping back keeps the U-Net's decoder
widths and a quarter of the weights of the deep 5x5x5 levels). Each decoder level owns a 1x1 head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoseg.model.blocks import NONLINS, NORMS, ConvNormAct, conv_op, transposed_conv_op
from autoseg.model.checks import check_input, check_topology
from autoseg.model.contract import Topology

Ints = Sequence[int]
#: He init's negative slope: PReLU starts at 0.25 (He et al. 2015 derived the init with it).
PRELU_INIT = 0.25


class Resample(nn.Module):
    """Down (conv) or up (transposed conv) by `stride` with kernel = stride, then norm and nonlinearity.

    Down: (b, c_in, *n) -> (b, c_out, *(n / stride)); up: (b, c_in, *n) -> (b, c_out, *(n * stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Ints, *, up: bool, topology: Topology) -> None:
        super().__init__()
        stride, dim = tuple(stride), topology.dim
        op = transposed_conv_op(dim) if up else conv_op(dim)
        self.conv = op(in_channels, out_channels, stride, stride=stride, bias=True)
        self.norm = NORMS.get(topology.norm)(out_channels, dim)
        self.act = NONLINS.get(topology.nonlin)(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ResidualConvs(nn.Module):
    """The V-Net's residual function: n conv-norm(-nonlin), the stage input added before the last nonlin.

    forward(x (b, c_in, *n), residual (b, c_out, *n)) -> nonlin(convs(x) + residual), (b, c_out, *n).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Ints, *, n_convs: int,
                 topology: Topology) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            ConvNormAct(in_channels if i == 0 else out_channels, out_channels, kernel, dim=topology.dim,
                        norm=topology.norm, act=False)
            for i in range(n_convs))
        self.acts = nn.ModuleList(NONLINS.get(topology.nonlin)(out_channels) for _ in range(n_convs))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        for conv, act in zip(self.convs[:-1], self.acts[:-1]):
            x = act(conv(x))
        return self.acts[-1](self.convs[-1](x) + residual)


class EncoderStage(nn.Module):
    """Stage s: (b, c_in, *n) -> (b, features[s], *(n / strides[s]))."""

    def __init__(self, topology: Topology, s: int, in_channels: int) -> None:
        super().__init__()
        features = topology.features_per_stage[s]
        if s == 0:
            same = in_channels == features
            self.entry = nn.Identity() if same else conv_op(topology.dim)(in_channels, features, 1, bias=True)
        else:
            self.entry = Resample(in_channels, features, topology.strides[s], up=False, topology=topology)
        self.downsamples = s > 0
        # stage 0's convs read the raw input (the projection only feeds the residual), deeper ones the down conv
        self.convs = ResidualConvs(features if self.downsamples else in_channels, features, topology.kernel_sizes[s],
                                   n_convs=topology.convs_per_stage[s], topology=topology)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        entry = self.entry(x)
        return self.convs(entry if self.downsamples else x, entry)


class DecoderLevel(nn.Module):
    """Level l: forward(low (b, features[l+1], *n), skip (b, features[l], *(n * strides[l+1])))
    -> (b, features[l], *(n * strides[l+1])); its 1x1 head is VNet.output_heads[l]."""

    def __init__(self, topology: Topology, level: int, *, num_classes: int) -> None:
        super().__init__()
        low, features = topology.features_per_stage[level + 1], topology.features_per_stage[level]
        self.up = Resample(low, features, topology.strides[level + 1], up=True, topology=topology)
        self.convs = ResidualConvs(2 * features, features, topology.kernel_sizes[level],
                                   n_convs=topology.convs_per_decoder_stage[level], topology=topology)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(low)
        return self.convs(torch.cat((up, skip), dim=1), up)


class VNet(nn.Module):
    """V-Net from a Topology. forward: (b, in_channels, *patch) -> logits (b, num_classes, *patch), or with
    `deep_supervision` True a list of n_stages - 1 maps, highest resolution first, map l of shape
    patch / (cumulative stride of stages 0..l). The patch must be divisible by `topology.total_stride`."""

    def __init__(self, topology: Topology, in_channels: int, num_classes: int) -> None:
        super().__init__()
        check_topology(topology, in_channels=in_channels, num_classes=num_classes, family="V-Net", min_stages=2)
        self.topology, self.in_channels, self.num_classes = topology, in_channels, num_classes
        self.deep_supervision = topology.deep_supervision
        feats = topology.features_per_stage
        self.encoder = nn.ModuleList(EncoderStage(topology, s, in_channels if s == 0 else feats[s - 1])
                                     for s in range(topology.n_stages))
        self.decoder = nn.ModuleList(DecoderLevel(topology, level, num_classes=num_classes)
                                     for level in range(topology.n_stages - 1))
        #: The 1x1 heads of the decoder levels, highest resolution first.
        self.output_heads = nn.ModuleList(conv_op(topology.dim)(feats[level], num_classes, 1, bias=True)
                                          for level in range(topology.n_stages - 1))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_input(x, dim=self.topology.dim, in_channels=self.in_channels, stride=self.topology.total_stride)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        features, outputs = skips[-1], []
        for level in range(len(self.decoder) - 1, -1, -1):
            features = self.decoder[level](features, skips[level])
            if self.deep_supervision or level == 0:
                outputs.append(self.output_heads[level](features))
        return outputs[::-1] if self.deep_supervision else outputs[0]


def init_weights(module: nn.Module) -> None:
    """He init for PReLU's starting slope (kaiming normal, a = 0.25) of every (transposed) conv, zero biases."""
    convs = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    for m in module.modules():
        if isinstance(m, convs):
            nn.init.kaiming_normal_(m.weight, a=PRELU_INIT)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
