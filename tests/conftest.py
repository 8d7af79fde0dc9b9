"""Shared fixtures: the project's own small synthetic dataset and the real data (when present)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from autoseg.dataset.synthetic import make_example_dataset

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Tests compare numbers computed in fp32 (engine == torch, nnU-Net's labels voxel for voxel), and CI machines
# differ in native bf16: `--precision auto` is held at fp32 here (subprocesses inherit it); the tests of the
# auto rule itself lift it (tests/test_runtime_device.py).
os.environ["AUTOSEG_CPU_AUTO_PRECISION"] = "fp32"


@pytest.fixture(scope="session")
def example_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean CT example dataset: 4 labelled cases of about 32^3 voxels, 2 in imagesTs.

    Session-scoped and shared: tests must not modify it (copy it first).
    """
    root = tmp_path_factory.mktemp("raw") / "Dataset900_Example"
    return make_example_dataset(root, n_cases=4, modality="ct", seed=0, size=32)


@pytest.fixture(scope="session")
def real_dataset() -> Path:
    """The real MSD Hippocampus dataset in ../shared/data; the test is skipped when absent."""
    path = REAL_DATA / "Dataset004_Hippocampus"
    if not (path / "dataset.json").is_file():
        pytest.skip(f"real dataset not found at {path}")
    return path


@pytest.fixture(scope="session")
def small_training_setup(example_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """(dataset, plans, location, root): the example planned and preprocessed under root/pre with a shrunken
    3d_fullres network (4-8 features, patch 16^3, batch 2) so training tests run in seconds."""
    import dataclasses

    from autoseg.dataset.load import load_dataset
    from autoseg.fingerprint import extract_fingerprint
    from autoseg.paths import DatasetLocation
    from autoseg.planning import plan
    from autoseg.preprocessing.run import preprocess_dataset

    root = tmp_path_factory.mktemp("train")
    dataset = load_dataset(example_dataset)
    plans = plan(extract_fingerprint(dataset), dataset)
    config = plans.configurations["3d_fullres"]
    topology = dataclasses.replace(config.topology, features_per_stage=(4, 8, 8, 8, 8)[: config.topology.n_stages])
    small = dataclasses.replace(config, topology=topology, patch_size=(16, 16, 16), batch_size=2)
    plans = dataclasses.replace(plans, configurations={"3d_fullres": small})
    preprocess_dataset(dataset, plans, ["3d_fullres"], out_root=root / "pre" / dataset.name)
    return dataset, plans, DatasetLocation(name=dataset.name, raw=Path(dataset.root)), root


@pytest.fixture()
def roots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Fresh AUTOSEG_RAW / _PREPROCESSED / _RESULTS folders under tmp_path, for command-line tests."""
    for kind in ("RAW", "PREPROCESSED", "RESULTS"):
        monkeypatch.setenv(f"AUTOSEG_{kind}", str(tmp_path / kind.lower()))
    return tmp_path


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny-tensor tests: thread start-up and contention with other
    processes cost more than they save (3x here; 20x and more on a loaded machine)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

