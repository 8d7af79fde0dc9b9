"""Build a network from a Topology by registry key; the one entry point training and inference use.

Model folders store `Topology.architecture` (a key here), never a class name, so any stored model
is rebuilt without custom code. Import this module explicitly (`import autoseg.model.build`):
`autoseg.model` itself stays free of torch so planning can use the size formulas cheaply.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from autoseg.model.contract import Topology
from autoseg.model.unet import UPSAMPLING, UNet
from autoseg.registry import Registry

#: Network builders by `Topology.architecture`: (topology, in_channels, num_classes) -> module.
ARCHITECTURES: Registry[Callable[[Topology, int, int], nn.Module]] = Registry("architecture")
ARCHITECTURES.register("plain_unet")(UNet)
ARCHITECTURES.register("resenc_unet")(UNet)


def build_network(topology: Topology, *, in_channels: int, num_classes: int) -> nn.Module:
    """The network of `topology`, He-initialised, deep supervision as `topology.deep_supervision`.

    Input (b, in_channels, *patch), patch divisible by `topology.total_stride`; output logits
    (b, num_classes, *patch), or a list of them highest resolution first with deep supervision.
    Raises SettingsError (with a "did you mean") for an unknown architecture or upsampling key.
    """
    builder = ARCHITECTURES.get(topology.architecture)
    UPSAMPLING.get(topology.upsampling)  # fail on a typo before building anything
    return builder(topology, in_channels, num_classes)


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (requires_grad), what `autoseg.model.size.parameter_count` predicts."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
