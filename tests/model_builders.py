"""Builders of small model folders for tests (untrained networks, real plans from the example dataset)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from autoseg.dataset.load import load_dataset
from autoseg.fingerprint import extract_fingerprint
from autoseg.model.build import build_network
from autoseg.model.contract import Topology
from autoseg.model_folder import ModelFolder, save_checkpoint
from autoseg.planning import plan
from autoseg.planning.contract import Plans
from autoseg.training.settings import TrainingSettings


def make_model_folder(root: Path, example_dataset: Path, configuration: str = "3d_fullres", *,
                      folds: tuple[int, ...] = (0,), seed: int = 0, plans: Plans | None = None) -> ModelFolder:
    """A model folder with untrained (random) small networks: enough to test every path but accuracy.

    `plans`: the example dataset's plans when already computed (planning takes a second or two).
    """
    if plans is None:
        dataset = load_dataset(example_dataset)
        plans = plan(extract_fingerprint(dataset), dataset)
    config = plans.configurations[configuration]
    features = (4, 8, 8, 8, 8, 8, 8)[: config.topology.n_stages]
    small = dataclasses.replace(config, topology=dataclasses.replace(config.topology, features_per_stage=features))
    plans = dataclasses.replace(plans, configurations={configuration: small})
    folder = ModelFolder.for_run(root, configuration, plans.plans_name)
    folder.write_metadata(plans, dataset_json=example_dataset / "dataset.json", settings=TrainingSettings())
    for fold in folds:
        torch.manual_seed(seed + fold)
        network = build_network(small.topology, in_channels=len(plans.channel_names), num_classes=plans.num_classes)
        save_checkpoint(folder.checkpoint(fold, "final"), {"network": network.state_dict(), "epoch": 1,
                                                           "mirror_axes": list(range(small.dim))})
    return folder


def field_extents(topology: Topology, size: tuple[int, ...], *, axis: int) -> list[int]:
    """Nonzero extent along `axis` of d(one output voxel)/d(input), for each voxel position in one
    total-stride period along that axis (one batch element each). Positive weights and inputs,
    batch norm in eval mode (a per-channel affine, unlike instance norm which couples all voxels);
    max pooling and unpooling spread their gradient over the window (`spread_max_windows`); a module marked
    `global_context` (image-level pooling, whose field is the whole input for any patch) is detached, so the
    measurement covers the local path that `NetworkFamily.path` describes."""
    topology = dataclasses.replace(topology, norm="batch", deep_supervision=False)
    net = build_network(topology, in_channels=1, num_classes=1).double().eval()
    net.deep_supervision = False
    spread_max_windows(net)
    for module in net.modules():
        if getattr(module, "global_context", False):
            module.register_forward_hook(lambda _module, _inputs, output: output.detach())
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.rand_like(parameter) * 0.5 + 0.1)
    period = topology.total_stride[axis]
    x = (torch.rand(period, 1, *size, dtype=torch.float64) + 0.5).requires_grad_(True)
    out = net(x)
    centre = [n // 2 for n in size]
    picked = []
    for b in range(period):
        position = list(centre)
        position[axis] += b
        picked.append(out[(b, 0, *position)])
    torch.stack(picked).sum().backward()
    extents = []
    for b in range(period):
        nonzero = x.grad[b, 0].ne(0).movedim(axis, 0).flatten(1).any(1).nonzero()[:, 0]
        assert nonzero.min() > 0 and nonzero.max() < size[axis] - 1, "field clipped: use a larger input"
        extents.append(int(nonzero.max() - nonzero.min() + 1))
    return extents


_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_MAX_UNPOOLS = (nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d)


def spread_max_windows(net: nn.Module) -> None:
    """Let the gradient through every nn.MaxPoolNd / nn.MaxUnpoolNd of `net` reach its whole window; outputs
    stay exactly the same.

    A max pooling passes the gradient to the argmax of each window only, and an unpooling reads only the
    argmax position, so the field measured on one input is narrower than the receptive field, which counts
    every voxel that is the max of its window for some input (the formula: a pooling of kernel = stride widens
    the field by (stride - 1) x jump, an unpooling adds nothing, like nearest upsampling). Forward hooks add
    a zero whose gradient covers the window: avg_pool(x) - avg_pool(x).detach() to a pooling's values,
    nearest(v) - nearest(v).detach() to an unpooling's output.
    """

    def pool_hook(module: nn.Module, inputs: tuple, output: object) -> object:
        x = inputs[0]
        avg_pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[x.ndim - 3]
        avg = avg_pool(x, module.kernel_size, module.stride, module.padding, module.ceil_mode)
        if isinstance(output, tuple):
            return (output[0] + (avg - avg.detach()), *output[1:])
        return output + (avg - avg.detach())

    def unpool_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        near = F.interpolate(inputs[0], size=output.shape[2:], mode="nearest-exact")
        return output + (near - near.detach())

    for module in net.modules():
        if isinstance(module, _MAX_POOLS):
            module.register_forward_hook(pool_hook)
        elif isinstance(module, _MAX_UNPOOLS):
            module.register_forward_hook(unpool_hook)
