"""The generic size estimator: parameters and activation elements measured on a built network.

The network is built on torch's meta device (shapes only: no memory, no arithmetic) and run on a
(1, in_channels, *probe) meta input with deep supervision off; `measure` scales the count to the patch.
Counted, as nnU-Net's VRAM proxy counts the U-Net (`autoseg.model.size`):

* the output of every conv and transposed conv (`torch.nn` conv modules);
* every tensor a module returns that no module returned before it and that the module computed itself:
  a resampling inside a module's forward (nearest upsampling, a pixel shuffle, a final interpolation),
  a residual sum returned without a following activation module;
* the output of a leaf module that changes the spatial shape (pooling, unpooling, upsampling modules).

Not counted: norm, nonlinearity and dropout outputs (elementwise on a counted tensor: the bytes per
element of `autoseg.planning.memory` account for them), concatenations, the input. For the U-Net these
rules give exactly `size.feature_map_elements` for all three upsampling steps (tests/test_families.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autoseg.errors import SettingsError
from autoseg.model.contract import Topology

if TYPE_CHECKING:
    from autoseg.model.families import NetworkFamily

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def measure(
    family: NetworkFamily, topology: Topology, patch: tuple[int, ...] | None, in_channels: int, num_classes: int
) -> tuple[int, int]:
    """(trainable parameters, activation elements for one sample of `patch`); elements 0 when patch is None.

    `patch` must be divisible by the total stride (planned patches are). The elements are counted once
    per topology on a probe of twice the total stride and scaled by the voxel ratio: exact when every
    counted tensor is a fixed fraction of the patch (each stage's maps are patch / its cumulative
    stride), which holds for networks built from stages; a tensor of fixed size (global pooling) is
    scaled too, a negligible error.
    """
    parameters, probe, probe_elements = _measure_topology(family, topology, in_channels, num_classes)
    if patch is None:
        return parameters, 0
    total = topology.total_stride
    if len(patch) != topology.dim or any(p % s for p, s in zip(patch, total)):
        raise SettingsError(f"patch {patch} is not a multiple of the total stride {total} of this {topology.dim}D "
                            "network", hint="planned patches always are: size a patch divisible by the stride")
    return parameters, probe_elements * math.prod(patch) // math.prod(probe)


@functools.lru_cache(maxsize=256)
def _measure_topology(
    family: NetworkFamily, topology: Topology, in_channels: int, num_classes: int
) -> tuple[int, tuple[int, ...], int]:
    """(parameters, probe patch, elements at the probe) of one network built on the meta device."""
    network = _meta_network(family, topology, in_channels, num_classes)
    parameters = sum(p.numel() for p in network.parameters() if p.requires_grad)
    probe = tuple(2 * s for s in topology.total_stride)
    return parameters, probe, count_elements(network, torch.empty((1, in_channels, *probe), device="meta"))


def _meta_network(family: NetworkFamily, topology: Topology, in_channels: int, num_classes: int) -> nn.Module:
    """The family's network on the meta device (shapes only), deep supervision off."""
    with torch.device("meta"):
        network = family.build(topology, in_channels, num_classes)
    if hasattr(network, "deep_supervision"):
        network.deep_supervision = False
    return network


def count_elements(network: nn.Module, x: torch.Tensor) -> int:
    """Activation elements of one forward pass of `network` on `x`, counted by the rules above."""
    seen: dict[int, torch.Tensor] = {}  # id -> tensor, kept alive so that ids stay unique
    total = 0

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal total
        leaf = next(module.children(), None) is None
        for tensor in _tensors(output):
            if id(tensor) in seen:
                continue
            seen[id(tensor)] = tensor
            if isinstance(module, _CONVS) or not leaf or _resamples(inputs, tensor):
                total += tensor.numel()

    handles = [module.register_forward_hook(hook) for module in network.modules()]
    try:
        with torch.no_grad():
            network(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


def _resamples(inputs: Any, output: torch.Tensor) -> bool:
    first = next(_tensors(inputs), None)
    return first is not None and first.ndim == output.ndim and first.shape[2:] != output.shape[2:]


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a module's output (a tensor, or lists, tuples and dicts of them)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
