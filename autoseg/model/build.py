"""Build a network from a Topology by its family; the one entry point training and inference use.

Model folders store `Topology.architecture` (a family's key, see `autoseg.model.families`), never a class
name, so any stored model is rebuilt without custom code. Import this module explicitly
(`import autoseg.model.build`): `autoseg.model` itself stays free of torch so planning stays cheap.
"""

from __future__ import annotations

from torch import nn

from autoseg.model.contract import Topology
from autoseg.model.families import check_upsampling, family_of


def build_network(topology: Topology, *, in_channels: int, num_classes: int) -> nn.Module:
    """The network of `topology`, He-initialised, deep supervision as `topology.deep_supervision`.

    Input (b, in_channels, *patch), patch divisible by `topology.total_stride`; output logits
    (b, num_classes, *patch), or a list of them highest resolution first with deep supervision.
    Raises SettingsError (with a "did you mean") for an unknown architecture or upsampling key.
    """
    family = family_of(topology)
    if family.upsampling:
        check_upsampling(topology.upsampling)  # fail on a typo before building anything
    return family.build(topology, in_channels, num_classes)


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (requires_grad), what `NetworkFamily.parameters` predicts."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
