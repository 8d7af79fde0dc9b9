"""Build what a fold trains with: network, optimizer, scaler, loss, and restore them from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autoseg.errors import SettingsError
from autoseg.log import get_logger
from autoseg.model_folder import CheckpointError
from autoseg.runtime.device import grad_scaler
from autoseg.runtime.distributed import RuntimeContext, replicas_identical, unwrap_model, wrap_model
from autoseg.training.init import initialise_outputs
from autoseg.training.loss import DeepSupervisionLoss, DiceCELoss, RegionDiceBCELoss
from autoseg.training.settings import TrainingSettings

if TYPE_CHECKING:
    from autoseg.training.loop import FoldRun

log = get_logger("training")


@dataclass
class TrainingObjects:
    network: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    loss: nn.Module
    context: RuntimeContext

    def load(self, payload: dict[str, Any]) -> None:
        """Restore weights, optimizer and scaler; a mismatching network is a clear error."""
        try:
            unwrap_model(self.network).load_state_dict(payload["network"])
        except RuntimeError as err:
            raise CheckpointError("the checkpoint does not fit this plan's network",
                                  hint="it was trained with another plan or configuration; train again or "
                                       "use the matching model folder") from err
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scaler.load_state_dict(payload["scaler"])

    def check_replicas_identical(self) -> None:
        """Under DDP, every rank must end with the same weights; raise if they drifted apart."""
        if not replicas_identical(unwrap_model(self.network), self.context):
            raise RuntimeError("DDP replicas diverged: the ranks hold different weights")


def build_training_objects(run: FoldRun, settings: TrainingSettings, context: RuntimeContext, *,
                           initialise: bool = True) -> TrainingObjects:
    """Network, optimizer, scaler and loss of a fold; `initialise=False` when a checkpoint will replace
    the weights (the output init's frequency measurement is then skipped)."""
    from autoseg.model.build import build_network

    torch.manual_seed(settings.seed)  # the same initial weights for a seed, on every rank
    network = build_network(run.config.topology, in_channels=run.in_channels, num_classes=run.num_classes)
    if initialise:
        initialise_outputs(network, settings.init, cache=run.cache, case_ids=run.train_ids, config=run.config,
                           num_classes=run.num_classes, batch_size=settings.batch_size or run.config.batch_size,
                           oversample=settings.foreground_oversample, seed=settings.seed, regions=run.regions,
                           ignore_label=run.ignore_label)
    network.deep_supervision = settings.deep_supervision
    network = network.to(context.device)
    if context.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: let cuDNN pick its fastest kernels once
    if settings.channels_last:
        network = network.to(memory_format=torch.channels_last_3d if run.config.dim == 3 else torch.channels_last)
    optimizer = torch.optim.SGD(network.parameters(), lr=settings.initial_lr, momentum=settings.momentum,
                                nesterov=True, weight_decay=settings.weight_decay)
    network = _maybe_compile(wrap_model(network, context, find_unused=not settings.deep_supervision), settings,
                             context)
    n_outputs = run.config.topology.n_stages - 1 if settings.deep_supervision else 1
    return TrainingObjects(network=network, optimizer=optimizer, scaler=grad_scaler(context.device, context.amp_dtype),
                           loss=DeepSupervisionLoss(_base_loss(run, settings), max(n_outputs, 1)), context=context)


def _base_loss(run: FoldRun, settings: TrainingSettings) -> nn.Module:
    batch_dice = run.config.batch_dice if settings.batch_dice is None else settings.batch_dice
    if run.regions:
        return RegionDiceBCELoss(run.regions, batch_dice=batch_dice, ignore_label=run.ignore_label)
    return DiceCELoss(batch_dice=batch_dice, ignore_label=run.ignore_label)


def _maybe_compile(network: nn.Module, settings: TrainingSettings, context: RuntimeContext) -> nn.Module:
    if not settings.compile:
        return network
    if context.device.type != "cuda":
        log.info("--compile is ignored on %s (it pays off on CUDA only)", context.device.type)
        return network
    try:
        return CompiledNetwork(network)
    except Exception as err:  # an unsupported GPU or a missing compiler: train uncompiled
        log.warning("torch.compile failed (%s): training without it", err)
        return network


class CompiledNetwork(nn.Module):
    """`network` run through torch.compile, falling back to eager if its first forward pass fails.

    torch.compile compiles lazily, at the first call, so a missing compiler or an unsupported GPU fails
    there and not in torch.compile(): the run then goes on uncompiled with a warning. Failures after a
    successful first call are real errors and are raised. `module` is the network itself, so
    `unwrap_model` (checkpoints) sees plain parameter names; the compiled callable is kept out of the
    module tree so the parameters are not listed twice.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.module = network
        self._compiled: list[Any] = [torch.compile(network)]
        self._first_call = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._compiled:
            return self.module(*args, **kwargs)
        if not self._first_call:
            return self._compiled[0](*args, **kwargs)
        try:
            output = self._compiled[0](*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any compiler failure: fall back, say why
            log.warning("torch.compile failed at the first step (%s: %s): training without it",
                        type(err).__name__, err)
            self._compiled.clear()
            return self.module(*args, **kwargs)
        self._first_call = False
        return output


def require_cache(run: FoldRun) -> None:
    """A clear error when the configuration was not preprocessed."""
    missing = [c for c in (*run.train_ids, *run.val_ids) if not (run.cache / f"{c}.json").is_file()]
    if missing:
        raise SettingsError(f"{len(missing)} case(s) are not preprocessed for {run.config.name} "
                            f"(e.g. {missing[0]})", path=run.cache,
                            hint=f"run `autoseg preprocess DATASET -c {run.config.name}` first")
