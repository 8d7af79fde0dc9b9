"""The U-Net of a Topology: plain or residual encoder, decoder with a choice of upsampling.

Tensors are (b, c, z, y, x) in 3D and (b, c, y, x) in 2D. Stage s of the encoder works at
resolution level s (level 0 = input resolution); decoder level l upsamples level l + 1 to
level l, concatenates the skip of encoder stage l and refines with convs, and owns the 1x1
segmentation head of level l. Heads exist at every level whether or not deep supervision is on,
so the same state_dict loads either way. Parameter counts of the plain U-Net equal
`autoseg.model.size.parameter_count` for every upsampling variant here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from autoseg.model.blocks import BasicBlock, ConvStack, ResidualStack, conv_op, pixel_shuffle, transposed_conv_op
from autoseg.model.checks import check_input, check_topology
from autoseg.model.contract import Topology
from autoseg.registry import Registry

Ints = Sequence[int]


class TransposedConvUp(nn.Module):
    """nnU-Net's upsampling: transposed conv with kernel = stride (no overlap between outputs).

    (b, c_in, *n) -> (b, c_out, *(n * stride)); c_in x c_out x prod(stride) weights + c_out bias.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Ints, *, dim: int) -> None:
        super().__init__()
        stride = tuple(stride)
        self.conv = transposed_conv_op(dim)(in_channels, out_channels, stride, stride=stride, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class InterpConvUp(nn.Module):
    """Nearest-neighbour upsampling by the stride with a 1x1 conv to the skip's channels.

    1x1, not 3x3: the decoder convs that follow the concatenation already mix space with the
    level's kernel, so a 3x3 here would only add weights, receptive field and a full-resolution
    activation. Nearest, not (tri)linear: its CUDA backward is deterministic (linear modes are on
    torch's non-deterministic list), the receptive field stays the one `size.receptive_field`
    gives, and every output of a stride block gets the same value, so no checkerboard. A 1x1
    conv commutes with nearest upsampling, so it runs first, at the low resolution (prod(stride)
    times cheaper). (b, c_in, *n) -> (b, c_out, *(n * stride)); c_in x c_out weights + c_out bias.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Ints, *, dim: int) -> None:
        super().__init__()
        self.stride = tuple(int(s) for s in stride)
        self.conv = conv_op(dim)(in_channels, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [n * s for n, s in zip(x.shape[2:], self.stride)]
        # "nearest-exact" maps output i to input floor((i + 0.5) / s): exact for integer strides,
        # where plain "nearest" can round 3 * (1/3) down to 0.
        return F.interpolate(self.conv(x), size=size, mode="nearest-exact")


class PixelShuffleUp(nn.Module):
    """Sub-pixel conv: 1x1 conv to c_out x prod(stride) channels, then a voxel shuffle by the stride.

    As expressive as the transposed conv (each output position of a stride block has its own
    weights) but initialised ICNR-style (Aitken et al. 2017): all positions of a block start with
    the same weights, i.e. as nearest upsampling of one 1x1 conv, so training starts free of
    checkerboard patterns. Works for 3D and anisotropic strides such as (1, 2, 2).
    (b, c_in, *n) -> (b, c_out, *(n * stride)); (c_in + 1) x c_out x prod(stride) weights and biases.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Ints, *, dim: int) -> None:
        super().__init__()
        self.stride = tuple(int(s) for s in stride)
        self.conv = conv_op(dim)(in_channels, out_channels * math.prod(self.stride), 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle(self.conv(x), self.stride)

    def icnr_init(self) -> None:
        """He-initialise one c_out kernel and repeat it for every position of the stride block."""
        taps = math.prod(self.stride)
        weight = self.conv.weight
        base = torch.empty(weight.shape[0] // taps, *weight.shape[1:], dtype=weight.dtype, device=weight.device)
        nn.init.kaiming_normal_(base, a=1e-2)
        with torch.no_grad():
            weight.copy_(base.repeat_interleave(taps, dim=0))
            self.conv.bias.zero_()


#: Upsampling steps by `Topology.upsampling` key: (c_in, c_out, stride, *, dim) -> module.
UPSAMPLING: Registry[type[nn.Module]] = Registry("upsampling")
UPSAMPLING.register("transposed_conv")(TransposedConvUp)
UPSAMPLING.register("interp_conv")(InterpConvUp)
UPSAMPLING.register("pixel_shuffle")(PixelShuffleUp)


class PlainEncoder(nn.Module):
    """nnU-Net's PlainConvUNet encoder: stage s = `convs_per_stage[s]` conv-norm-nonlin, strided first conv.

    forward: (b, c_in, *n) -> one feature map per stage, highest resolution first.
    """

    def __init__(self, topology: Topology, in_channels: int) -> None:
        super().__init__()
        stages, channels = [], in_channels
        for s, features in enumerate(topology.features_per_stage):
            stages.append(
                ConvStack(
                    channels,
                    features,
                    topology.kernel_sizes[s],
                    n_convs=topology.convs_per_stage[s],
                    stride=topology.strides[s],
                    **_ops(topology),
                )
            )
            channels = features
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class ResidualEncoder(nn.Module):
    """nnU-Net's ResEnc encoder: a conv-norm-nonlin stem (stage-0 kernel, stride 1) to features[0],
    then stage s = `convs_per_stage[s]` residual BasicBlocks, the first carrying the stride.

    forward: (b, c_in, *n) -> one feature map per stage, highest resolution first.
    """

    def __init__(self, topology: Topology, in_channels: int) -> None:
        super().__init__()
        feats = topology.features_per_stage
        self.stem = ConvStack(in_channels, feats[0], topology.kernel_sizes[0], n_convs=1, **_ops(topology))
        self.stages = nn.ModuleList(
            ResidualStack(
                feats[max(s - 1, 0)],
                features,
                topology.kernel_sizes[s],
                n_blocks=topology.convs_per_stage[s],
                stride=topology.strides[s],
                **_ops(topology),
            )
            for s, features in enumerate(feats)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


#: Encoders by `Topology.architecture` key: (topology, in_channels) -> module.
ENCODERS: Registry[type[nn.Module]] = Registry("architecture")
ENCODERS.register("plain_unet")(PlainEncoder)
ENCODERS.register("resenc_unet")(ResidualEncoder)


class DecoderLevel(nn.Module):
    """Decoder level l: upsample level l + 1, concatenate the skip, convs, and level l's 1x1 head.

    forward(low (b, c_low, *n), skip (b, c_skip, *(n * stride))) -> (b, c_skip, *(n * stride));
    the head, (b, c_skip, ...) -> (b, num_classes, ...), is applied by the UNet when needed.
    """

    def __init__(self, topology: Topology, level: int, *, num_classes: int) -> None:
        super().__init__()
        low, skip = topology.features_per_stage[level + 1], topology.features_per_stage[level]
        self.up = UPSAMPLING.get(topology.upsampling)(low, skip, topology.strides[level + 1], dim=topology.dim)
        self.convs = ConvStack(
            2 * skip,
            skip,
            topology.kernel_sizes[level],
            n_convs=topology.convs_per_decoder_stage[level],
            **_ops(topology),
        )
        self.head = conv_op(topology.dim)(skip, num_classes, 1, bias=True)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat((self.up(low), skip), dim=1))


class UNet(nn.Module):
    """U-Net from a Topology. forward: (b, in_channels, *patch) -> logits.

    With `self.deep_supervision` True (settable; starts as `topology.deep_supervision`) the
    output is a list of n_stages - 1 logit maps, highest resolution first, map l of shape
    (b, num_classes, *(patch / cumulative stride of stages 0..l)); with it False, only the
    full-resolution map (b, num_classes, *patch) is computed and returned as a tensor.
    The patch must be divisible by `topology.total_stride`.
    """

    def __init__(self, topology: Topology, in_channels: int, num_classes: int) -> None:
        super().__init__()
        check_topology(topology, in_channels=in_channels, num_classes=num_classes, min_stages=2)
        self.topology = topology
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.deep_supervision = topology.deep_supervision
        self.encoder = ENCODERS.get(topology.architecture)(topology, in_channels)
        self.decoder = nn.ModuleList(
            DecoderLevel(topology, level, num_classes=num_classes) for level in range(topology.n_stages - 1)
        )
        init_weights(self)

    #: Set by prediction (autoseg.inference.sliding): with deep supervision off, forward returns the
    #: full-resolution features that `linear_output_head` would turn into logits. The head is a 1x1 conv, so
    #: blending tiles commutes with it: a window can blend these (fewer channels than 100 classes) instead.
    features_only = False

    @property
    def output_heads(self) -> list[nn.Module]:
        """The 1x1 segmentation heads, highest resolution first (what an output init adjusts)."""
        return [level.head for level in self.decoder]

    @property
    def linear_output_head(self) -> nn.Module:
        """The 1x1 conv whose output is forward's output when deep supervision is off."""
        return self.decoder[0].head

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_input(x, dim=self.topology.dim, in_channels=self.in_channels, stride=self.topology.total_stride)
        skips = self.encoder(x)
        features = skips[-1]
        outputs = []
        for level in range(len(self.decoder) - 1, -1, -1):
            block = self.decoder[level]
            features = block(features, skips[level])
            if level == 0 and self.features_only and not self.deep_supervision:
                return features
            if self.deep_supervision or level == 0:
                outputs.append(block.head(features))
        if not self.deep_supervision:
            return outputs[0]
        return outputs[::-1]


def init_weights(module: nn.Module) -> None:
    """He init (kaiming normal, a = 1e-2) of every conv and transposed conv, zero biases; then
    zero the last norm of each residual block and ICNR-initialise the sub-pixel convs."""
    convs = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    for m in module.modules():
        if isinstance(m, convs):
            nn.init.kaiming_normal_(m.weight, a=1e-2)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, BasicBlock):
            m.zero_init_last_norm()
        elif isinstance(m, PixelShuffleUp):
            m.icnr_init()


def _ops(topology: Topology) -> dict[str, Any]:
    """The keyword arguments every block takes from the topology."""
    return {"dim": topology.dim, "norm": topology.norm, "nonlin": topology.nonlin}
