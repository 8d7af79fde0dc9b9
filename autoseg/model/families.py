"""Network families: one registry entry per family, used by the planner, training and inference alike.

A family is one module in `autoseg/model/networks/` that calls `register(NetworkFamily(...))` at import;
nothing else needs editing. The registry imports `autoseg.model.networks.<name>` when `<name>` is asked
for, and every module of that package when all families are listed, so importing `autoseg.model` stays
free of torch (a family module should import torch inside its builder, as `unet` and `resenc` do, so
that planning does not load torch either).

What a family gets from the planner: the plain U-Net of the planner's stage plan (per stage: kernel,
stride and features; nnU-Net's rules, docs/planning.md). `NetworkFamily.topology` maps it to the family's
own Topology (blocks per stage, decoder convs, ...); `build` turns that into a torch module with:

* forward (b, in_channels, *patch) -> logits (b, num_classes, *patch), or, with `deep_supervision` True
  on a family that has decoder levels, a list of n_stages - 1 maps, highest resolution first, map l of
  shape patch / (cumulative stride of stages 0..l) (what the loss and the loader's targets expect);
  a family that supervises more than one network or path (W-Net's two U-Nets, M-Net's side outputs)
  returns k such groups one after the other, the final prediction's group first (the loss sums them);
* a settable `deep_supervision` attribute and `output_heads` (the 1x1 heads, highest resolution first,
  which the output-bias init adjusts);
* patches divisible by `topology.total_stride`.

Sizes: a family may give closed-form `SizeFormulas` (the U-Net keeps its calibrated ones, see
docs/networks.md); otherwise parameters and activation elements are measured on a network built on
torch's meta device (`autoseg.model.measure`). The receptive field always comes from the lecture's
formula over the layers of the family's deepest path (`path`, `autoseg.model.receptive`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from autoseg.model.contract import Topology
from autoseg.model.receptive import Layer
from autoseg.model.receptive import receptive_field as path_field
from autoseg.registry import Registry

#: The family of the default plans (plans.json, model folders CONFIG__autoseg).
DEFAULT_NETWORK = "unet"
#: Decoder upsampling steps a family with `upsampling=True` accepts (built by `autoseg.model.unet`).
UPSAMPLING_KINDS = ("transposed_conv", "interp_conv", "pixel_shuffle")
DEFAULT_UPSAMPLING = "transposed_conv"
NETWORKS_PACKAGE = "autoseg.model.networks"
#: Topology.architecture keys stored before the family registry, and the family that builds them.
LEGACY_ARCHITECTURES = {"plain_unet": "unet", "resenc_unet": "resenc"}

#: (topology, in_channels, num_classes) -> torch.nn.Module
Builder = Callable[[Topology, int, int], Any]


@dataclass(frozen=True)
class SizeFormulas:
    """Closed-form sizes: parameters(topology, *, in_channels, num_classes) and
    elements(topology, patch, *, in_channels, num_classes) (activation elements, batch size 1)."""

    parameters: Callable[..., int]
    elements: Callable[..., int]


@dataclass(frozen=True)
class NetworkFamily:
    """One family. `name` is the registry key, the `--network` value and the plans identifier;
    `architecture` the key written into Topology.architecture (default: the name)."""

    name: str
    description: str
    build: Builder
    #: The planner's plain U-Net (stage plan) -> this family's topology.
    topology: Callable[[Topology], Topology]
    #: The layers along the deepest path of a topology, for the receptive field formula.
    path: Callable[[Topology], Sequence[Layer]]
    #: True: one head per decoder level (deep supervision); False: a single output.
    deep_supervision: bool = True
    #: True when `--upsampling` chooses the decoder's upsampling step.
    upsampling: bool = True
    architecture: str = ""
    formulas: SizeFormulas | None = None

    @property
    def key(self) -> str:
        return self.architecture or self.name

    def plan_topology(self, stage_plan: Topology, upsampling: str | None = None) -> Topology:
        """This family's topology for the planner's stage plan, with `upsampling` where it applies."""
        topology = replace(self.topology(stage_plan), architecture=self.key, deep_supervision=self.deep_supervision)
        if upsampling is not None and self.upsampling:
            topology = replace(topology, upsampling=check_upsampling(upsampling))
        return topology

    def parameters(self, topology: Topology, *, in_channels: int, num_classes: int) -> int:
        """Trainable parameters: the family's formula, else counted on a network built on the meta device."""
        if self.formulas is not None:
            return self.formulas.parameters(topology, in_channels=in_channels, num_classes=num_classes)
        from autoseg.model.measure import measure

        return measure(self, topology, None, in_channels, num_classes)[0]

    def elements(self, topology: Topology, patch: Sequence[int], *, in_channels: int, num_classes: int) -> int:
        """Activation elements for one sample of `patch` (voxels, array order), deep supervision off."""
        patch = tuple(int(p) for p in patch)
        if self.formulas is not None:
            return self.formulas.elements(topology, patch, in_channels=in_channels, num_classes=num_classes)
        from autoseg.model.measure import measure

        return measure(self, topology, patch, in_channels, num_classes)[1]

    def receptive_field(self, topology: Topology) -> tuple[int, ...]:
        """Receptive field in input voxels per axis (array order), by the formula with dilation."""
        return path_field(self.path(topology), topology.dim)


class FamilyRegistry(Registry[NetworkFamily]):
    """The registry of families, filled by importing the family modules on demand."""

    def get(self, name: str) -> NetworkFamily:
        self._load(name)
        return super().get(name)

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str):
            self._load(name)
        return super().__contains__(name)

    def __iter__(self) -> Iterator[str]:
        self.load_all()
        return super().__iter__()

    def families(self) -> list[NetworkFamily]:
        """Every registered family, by name."""
        return [self.get(name) for name in self]

    def load_all(self) -> None:
        """Import every module of autoseg.model.networks (each registers its family)."""
        package = importlib.import_module(NETWORKS_PACKAGE)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{NETWORKS_PACKAGE}.{info.name}")

    def _load(self, name: str) -> None:
        key = name.lower()
        if key in self._items:
            return
        if key.isidentifier():
            try:
                importlib.import_module(f"{NETWORKS_PACKAGE}.{key}")
            except ModuleNotFoundError as err:
                if err.name != f"{NETWORKS_PACKAGE}.{key}":
                    raise
        if key not in self._items:
            self.load_all()


#: Network families by name.
NETWORKS = FamilyRegistry("network")


def register(family: NetworkFamily) -> NetworkFamily:
    """Add a family to NETWORKS (call it once, in the family's module)."""
    return NETWORKS.register(family.name)(family)


def family_of(topology: Topology) -> NetworkFamily:
    """The family that builds `topology` (by Topology.architecture); SettingsError with a suggestion if none."""
    key = topology.architecture.lower()
    name = LEGACY_ARCHITECTURES.get(key, key)
    if name in NETWORKS and NETWORKS.get(name).key == key:
        return NETWORKS.get(name)
    by_key = {family.key: family for family in NETWORKS.families()}
    if key in by_key:
        return by_key[key]
    keys = Registry[NetworkFamily]("architecture")
    for family_key, family in by_key.items():
        keys.register(family_key)(family)
    return keys.get(key)  # raises with "did you mean"


def check_upsampling(kind: str) -> str:
    """`kind` if it is a known upsampling step, else SettingsError with a suggestion."""
    known = Registry[str]("upsampling")
    for name in UPSAMPLING_KINDS:
        known.register(name)(name)
    known.get(kind)
    return kind.lower()
