"""Builders of small model folders for tests (untrained networks, real plans from the example dataset)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from autoseg.dataset.load import load_dataset
from autoseg.fingerprint import extract_fingerprint
from autoseg.model.build import build_network
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
