"""FCN-8s of a Topology (`autoseg.model.networks.fcn`), and what single-output families share.

Tensors are (b, c, z, y, x) in 3D and (b, c, y, x) in 2D; kernels, strides and factors per axis in
array order. Stage s of the encoder works at the cumulative stride of stages 0..s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoseg.errors import SettingsError
from autoseg.model.blocks import conv_op, transposed_conv_op
from autoseg.model.checks import check_input, check_topology
from autoseg.model.contract import Topology
from autoseg.model.networks.fcn import fused_stages, upsampling_factors, upsampling_kernel
from autoseg.model.unet import PlainEncoder, init_weights


class SingleOutputNet(nn.Module):
    """Base of networks without decoder levels: one full-resolution output, `deep_supervision` always False
    (setting it True raises: there are no lower-resolution outputs to supervise)."""

    topology: Topology
    in_channels: int

    @property
    def deep_supervision(self) -> bool:
        return False

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        if value:
            raise SettingsError(f"the {self.topology.architecture} network has a single output",
                                hint="train it without deep supervision (autoseg does so for this family)")

    def check_input(self, x: torch.Tensor, stride: Sequence[int]) -> None:
        """SettingsError unless x is (b, in_channels, *n) with every n divisible by `stride`."""
        check_input(x, dim=self.topology.dim, in_channels=self.in_channels, stride=stride)


def bilinear_kernel(kernel: Sequence[int]) -> torch.Tensor:
    """Separable (bi/tri)linear interpolation weights of shape `kernel` (FCN's upsampling init): per axis
    1 - |t - centre| / f with f = ceil(k / 2); with stride f and padding f // 2 a transposed conv then
    interpolates like F.interpolate(align_corners=False) away from the border."""
    weights = torch.ones(())
    for k in kernel:
        factor = (k + 1) // 2
        centre = factor - 1 if k % 2 else factor - 0.5
        taps = 1 - (torch.arange(k, dtype=torch.float64) - centre).abs() / factor
        weights = weights[..., None] * taps
    return weights.float()


class LearnedUpsampling(nn.Module):
    """FCN's upsampling: a transposed conv (kernel 2f - f % 2, stride f, padding f // 2 per axis) that maps
    each class onto itself by (bi/tri)linear interpolation at initialisation and is learned afterwards.
    (b, c, *n) -> (b, c, *(n * f)); c x c x prod(kernel) weights (+ c with `bias`)."""

    def __init__(self, channels: int, factor: Sequence[int], *, dim: int, bias: bool) -> None:
        super().__init__()
        self.factor = tuple(int(f) for f in factor)
        self.conv = transposed_conv_op(dim)(channels, channels, upsampling_kernel(self.factor), stride=self.factor,
                                            padding=tuple(f // 2 for f in self.factor), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def interpolation_init(self) -> None:
        """Weights = interpolation of each channel onto itself (zero across channels), bias 0."""
        weight = self.conv.weight
        with torch.no_grad():
            weight.zero_()
            kernel = bilinear_kernel(weight.shape[2:]).to(weight.device, weight.dtype)
            for c in range(weight.shape[0]):
                weight[c, c] = kernel
            if self.conv.bias is not None:
                self.conv.bias.zero_()


class FCN(SingleOutputNet):
    """FCN-8s. forward: (b, in_channels, *patch) -> logits (b, num_classes, *patch), patch divisible by
    `topology.total_stride`. The scores of the fused stages (`fused_stages`, finest first) are summed from
    the deepest up, each sum upsampled by the next stage's stride; the last upsampling (the output head,
    with the only upsampling bias) goes from the finest fused stage to the input resolution."""

    def __init__(self, topology: Topology, in_channels: int, num_classes: int) -> None:
        super().__init__()
        check_topology(topology, in_channels=in_channels, num_classes=num_classes, family=topology.architecture,
                       decoder=False)
        self.topology, self.in_channels, self.num_classes = topology, in_channels, num_classes
        self.stages = fused_stages(topology)
        self.encoder = PlainEncoder(topology, in_channels)
        conv = conv_op(topology.dim)
        self.scores = nn.ModuleList(conv(topology.features_per_stage[s], num_classes, 1, bias=True)
                                    for s in self.stages)
        factors = upsampling_factors(topology)
        self.upsampling = nn.ModuleList(LearnedUpsampling(num_classes, f, dim=topology.dim, bias=False)
                                        for f in factors[:-1])
        self.head = LearnedUpsampling(num_classes, factors[-1], dim=topology.dim, bias=True)
        init_weights(self)
        for up in (*self.upsampling, self.head):
            up.interpolation_init()

    @property
    def output_heads(self) -> list[nn.Module]:
        """The final upsampling: its bias is the output's class prior (the only bias added after the sum)."""
        return [self.head.conv]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, self.topology.total_stride)
        features = self.encoder(x)
        scores = [score(features[s]) for score, s in zip(self.scores, self.stages)]
        fused = scores[-1]
        for up, finer in zip(self.upsampling, reversed(scores[:-1])):
            fused = up(fused) + finer
        return self.head(fused)

