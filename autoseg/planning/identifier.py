"""Plans identifiers: which plans file a network family's plans go to, and how `-p NAME` finds them.

The default plans (the U-Net with transposed-conv upsampling) keep the identifier `autoseg`, the file
`plans.json` and the model folders `CONFIGURATION__autoseg`, as before network families existed. Any
other family is planned into `plans__IDENTIFIER.json` beside it (nnU-Net's `-p` plans identifier), with
IDENTIFIER = the network name, plus `_<upsampling>` when the upsampling is not the default one
(`resenc`, `resenc_pixel_shuffle`, `unet_interp_conv`); its model folders are `CONFIGURATION__IDENTIFIER`.
"""

from __future__ import annotations

import re

from autoseg.errors import SettingsError
from autoseg.model.families import DEFAULT_NETWORK, DEFAULT_UPSAMPLING, NETWORKS, UPSAMPLING_KINDS, check_upsampling

DEFAULT_PLANS = "autoseg"
DEFAULT_PLANS_FILE = "plans.json"
_VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def plans_identifier(network: str = DEFAULT_NETWORK, upsampling: str | None = None) -> str:
    """The identifier of the plans of `network` with `upsampling` (None: the family's default)."""
    family = NETWORKS.get(network)
    suffix = ""
    if upsampling is not None and check_upsampling(upsampling) != DEFAULT_UPSAMPLING:
        if not family.upsampling:
            raise SettingsError(f"network {family.name!r} has no choice of upsampling",
                                hint="leave out --upsampling for this network")
        suffix = f"_{upsampling.lower()}"
    if family.name == DEFAULT_NETWORK and not suffix:
        return DEFAULT_PLANS
    return family.name + suffix


def resolve_identifier(name: str | None) -> str:
    """A `-p` value as a plans identifier: None and the default network's name mean the default plans."""
    if name is None or name.lower() == DEFAULT_NETWORK:
        return DEFAULT_PLANS
    if not _VALID.fullmatch(name):
        raise SettingsError(f"{name!r} is not a plans identifier",
                            hint="use the name `autoseg plan --network NAME` wrote, e.g. -p resenc")
    return name


def plans_file_name(identifier: str) -> str:
    """plans.json for the default plans, plans__IDENTIFIER.json otherwise."""
    identifier = resolve_identifier(identifier)
    return DEFAULT_PLANS_FILE if identifier == DEFAULT_PLANS else f"plans__{identifier}.json"


def plan_flags(identifier: str) -> str:
    """The `autoseg plan` flags that write the plans of `identifier` ("" for the default plans)."""
    identifier = resolve_identifier(identifier)
    if identifier == DEFAULT_PLANS:
        return ""
    for kind in UPSAMPLING_KINDS:
        if identifier.endswith(f"_{kind}"):
            return f"--network {identifier[: -len(kind) - 1]} --upsampling {kind}"
    return f"--network {identifier}"
