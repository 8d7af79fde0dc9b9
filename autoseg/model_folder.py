"""The model folder: the one contract between training (writes it) and inference (reads it).

    <results>/<dataset>/<configuration>__<plans name>/
        plans.json  dataset.json  training.json  splits.json
        fold_<k>/checkpoint_{final,best,latest}.pt  training.json  metrics.jsonl  progress.png  training.log
        fold_<k>/validation/CASE<ending>  CASE.npz  prediction.json  summary.json

A cascade stage (plans' Configuration.previous_stage set) takes the previous stage's segmentation as
extra one-hot input channels, one per foreground label value of dataset.json (`previous_stage`).

Checkpoints hold only tensors and plain data, loaded with `torch.load(weights_only=True)`; the
network is rebuilt from the plan's Topology, never unpickled, so any folder loads without code.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoseg.dataset.contract import Dataset
from autoseg.errors import AutosegError
from autoseg.planning.contract import Configuration, Plans
from autoseg.planning.sanity import plans_problems
from autoseg.serialization import atomic_write, load_contract, save_contract

CHECKPOINT_NAMES = ("final", "best", "latest")


class CheckpointError(AutosegError):
    """A checkpoint or model folder is missing, corrupt or incompatible."""


@dataclass(frozen=True)
class ModelFolder:
    """Paths of one trained configuration; everything predict needs is inside."""

    root: Path

    @classmethod
    def for_run(cls, results: Path, configuration: str, plans_name: str) -> ModelFolder:
        return cls(results / f"{configuration}__{plans_name}")

    @property
    def plans_file(self) -> Path:
        return self.root / "plans.json"

    @property
    def dataset_file(self) -> Path:
        return self.root / "dataset.json"

    @property
    def settings_file(self) -> Path:
        return self.root / "training.json"

    def fold_settings_file(self, fold: int | str) -> Path:
        """The settings this fold was (last) trained with; training.json beside plans.json is the latest run's."""
        return self.fold_dir(fold) / "training.json"

    def fold_dir(self, fold: int | str) -> Path:
        return self.root / f"fold_{fold}"

    def validation_dir(self, fold: int | str) -> Path:
        """Full sliding-window predictions of the fold's validation cases, and their evaluation."""
        return self.fold_dir(fold) / "validation"

    def checkpoint(self, fold: int | str, name: str) -> Path:
        return self.fold_dir(fold) / f"checkpoint_{name}.pt"

    def folds(self, checkpoint: str = "final") -> tuple[str, ...]:
        """Folds with a `checkpoint` (final, best, latest) checkpoint, in order (numbered first, then "all")."""
        found = [p.parent.name.removeprefix("fold_") for p in self.root.glob(f"fold_*/checkpoint_{checkpoint}.pt")]
        return tuple(sorted(found, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f)))

    def write_metadata(self, plans: Plans, *, dataset_json: Path, settings: Any) -> None:
        """Plans, dataset.json and the training settings, so the folder stands on its own."""
        self.root.mkdir(parents=True, exist_ok=True)
        save_contract(self.plans_file, plans)
        atomic_write(self.dataset_file, lambda tmp: shutil.copyfile(dataset_json, tmp))
        save_contract(self.settings_file, settings)

    def load_plans(self) -> Plans:
        if not self.plans_file.is_file():
            raise CheckpointError("not a model folder (no plans.json)", path=self.root,
                                  hint="point at the folder that `autoseg train` wrote")
        plans = load_contract(self.plans_file, Plans, rerun="autoseg train (the plans format changed)")
        problems = plans_problems(plans)
        if problems:
            raise CheckpointError(f"plans.json asks for values no network can be built from: {'; '.join(problems[:4])}",
                                  path=self.plans_file, hint="use plans written by `autoseg plan`, or fix these "
                                                             "values by hand")
        return plans


@dataclass(frozen=True)
class PreviousStage:
    """What a cascade stage is fed besides the scan: the segmentation of `configuration` (e.g. 3d_lowres),
    as one-hot channels for `values` (ascending foreground label values) after the image channels.

    Not stored separately: it follows from the folder's plans.json (Configuration.previous_stage) and
    dataset.json (the label values), so training and inference derive the same channels.
    """

    configuration: str
    values: tuple[int, ...]


def previous_stage(config: Configuration, dataset: Dataset) -> PreviousStage | None:
    """The previous stage of a cascade configuration; None for a configuration that stands alone."""
    if not config.previous_stage:
        return None
    return PreviousStage(config.previous_stage, dataset.foreground_values)


def network_in_channels(plans: Plans, config: Configuration, dataset: Dataset) -> int:
    """Input channels of the configuration's network: the image channels, plus the cascade's one-hot ones."""
    previous = previous_stage(config, dataset)
    return len(plans.channel_names) + (len(previous.values) if previous else 0)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save to a temporary file, then rename: an interrupted save keeps the old checkpoint."""
    import torch

    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only) with clear errors for missing or damaged files."""
    import torch

    if not path.is_file():
        raise CheckpointError("checkpoint not found", path=path,
                              hint="train this fold first, or check the fold number and model folder")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint cannot be loaded ({type(err).__name__}: {str(err)[:200]})", path=path,
                              hint="the file is damaged or not an autoseg checkpoint: retrain, or use another "
                                   "checkpoint (latest/best/final)") from err
    if not isinstance(payload, dict) or "network" not in payload:
        raise CheckpointError("file is not an autoseg checkpoint", path=path, hint="use a checkpoint_*.pt it wrote")
    return payload
