"""Every network family through the pipeline on the example dataset, and a family added by a test alone.

Per registered family: a few steps lower the loss, the end-of-training validation and the predictor run,
the ONNX export gives PyTorch's logits. A toy family registered here (no package file edited) plans into
plans__toy.json, shares the default plans' cache, trains (the training loop), validates and predicts
from the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from autoseg.cli import app
from autoseg.evaluation.compare import compare
from autoseg.inference import PredictOptions, Predictor, predict_folder
from autoseg.inference.validation import predict_validation
from autoseg.model.contract import Topology
from autoseg.model.families import NETWORKS, NetworkFamily, register
from autoseg.model.receptive import Layer
from autoseg.model_folder import save_checkpoint
from autoseg.runtime.distributed import RuntimeContext
from autoseg.training.data import make_loader
from autoseg.training.job import fold_run, for_network
from autoseg.training.settings import TrainingSettings
from autoseg.training.setup import build_training_objects
from autoseg.training.steps import to_device, train_step

FAMILIES = sorted(NETWORKS)
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AUTOSEG_PREPROCESSED", "AUTOSEG_RESULTS"):
        monkeypatch.setenv(name, os.environ.get(name, ""))


@pytest.fixture(scope="module")
def small_2d_setup(example_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """(dataset, plans, location, root) as `small_training_setup`, for the example's 2d configuration:
    4-8 features, patch four times the total stride (at least 32: on a 2x2 deepest map ENet's 48 instance norms
    over 4 values amplify float32 rounding beyond the ONNX check's tolerance), batch 2."""
    from autoseg.dataset.load import load_dataset
    from autoseg.fingerprint import extract_fingerprint
    from autoseg.paths import DatasetLocation
    from autoseg.planning import plan
    from autoseg.preprocessing.run import preprocess_dataset

    root = tmp_path_factory.mktemp("train2d")
    dataset = load_dataset(example_dataset)
    plans = plan(extract_fingerprint(dataset), dataset)
    config = plans.configurations["2d"]
    features = (4, 8, 8, 8, 8, 8, 8)[: config.topology.n_stages]
    topology = dataclasses.replace(config.topology, features_per_stage=features)
    patch = tuple(max(32, 4 * s) for s in topology.total_stride)
    small = dataclasses.replace(config, topology=topology, patch_size=patch, batch_size=2)
    plans = dataclasses.replace(plans, configurations={"2d": small})
    preprocess_dataset(dataset, plans, ["2d"], out_root=root / "pre" / dataset.name)
    return dataset, plans, DatasetLocation(name=dataset.name, raw=Path(dataset.root)), root


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
@pytest.mark.parametrize("name", FAMILIES)
def test_family_learns_validates_predicts_and_exports(name: str, configuration: str, request: pytest.FixtureRequest,
                                                      example_dataset: Path, tmp_path: Path,
                                                      _environment: None) -> None:
    """Eight steps of the training objects (loss, output init, optimizer) on one batch of the shared cache
    lower the loss; the weights then go through validation, the predictor and ONNX; in 3D and in 2D."""
    fixture = "small_training_setup" if configuration == "3d_fullres" else "small_2d_setup"
    dataset, plans, location, root = request.getfixturevalue(fixture)
    config = plans.configurations[configuration]
    config = dataclasses.replace(config, topology=NETWORKS.get(name).plan_topology(config.topology))
    plans = dataclasses.replace(plans, plans_name=name, configurations={configuration: config})
    os.environ["AUTOSEG_PREPROCESSED"], os.environ["AUTOSEG_RESULTS"] = str(root / "pre"), str(tmp_path)
    run = fold_run(location, dataset, plans, configuration, 0)
    assert run.folder.root.name == f"{configuration}__{name}" and run.cache.name == f"autoseg_{configuration}"
    settings = for_network(TrainingSettings(initial_lr=0.02, workers=0, seed=3), config)
    context = RuntimeContext(device=torch.device("cpu"))
    objects = build_training_objects(run, settings, context)
    with make_loader(run.cache, run.train_ids, config, augmentation="none", workers=0, seed=0,
                     deep_supervision=settings.deep_supervision) as loader:
        batch = to_device(next(loader), context.device)
    losses = [train_step(objects.network, objects.optimizer, objects.loss, batch, scaler=objects.scaler,
                         amp_dtype=context.amp_dtype, grad_clip=12.0) for _ in range(8)]
    assert losses[-1] < losses[0]
    run.folder.write_metadata(plans, dataset_json=example_dataset / "dataset.json", settings=settings)
    save_checkpoint(run.folder.checkpoint(0, "final"), {"network": objects.network.state_dict(), "epoch": 1,
                                                        "mirror_axes": []})  # no mirroring: 8x faster
    case = run.val_ids[0]
    validation = predict_validation(run.folder, 0, cache=run.cache, case_ids=(case,),
                                    file_ending=dataset.file_ending, device="cpu", save_probabilities=True)
    assert (validation / f"{case}.nii.gz").is_file() and (validation / f"{case}.npz").is_file()
    row, = (r for r in compare(run.folder.root.parent).rows if r.model == run.folder.root.name)
    assert row.network == name and row.folds == ("0",) and row.dice_source == "none"
    assert row.prediction_seconds_per_case is not None and row.prediction_seconds_per_case > 0
    predictor = Predictor.from_folder(run.folder.root, PredictOptions(tta=False, device="cpu"))
    report = predict_folder(predictor, example_dataset / "imagesTs" / "test_000_0000.nii.gz", tmp_path / "pred")
    assert report.written == ["test_000"] and not report.failed
    pytest.importorskip("onnxruntime")
    from autoseg.sharing.onnx_export import export_onnx

    exported = export_onnx(run.folder.root, tmp_path / "model.onnx")
    assert exported.max_abs_diff is not None and exported.max_abs_diff < 1e-3


class ToyNet(nn.Module):
    """A family defined by this test: conv, dilated conv (rate 2), 1x1 head; one output at full resolution."""

    def __init__(self, topology: Topology, in_channels: int, num_classes: int) -> None:
        super().__init__()
        conv = nn.Conv3d if topology.dim == 3 else nn.Conv2d
        kernel = topology.kernel_sizes[0]
        width = topology.features_per_stage[0]
        self.body = nn.Sequential(
            conv(in_channels, width, kernel, padding=tuple(k // 2 for k in kernel)), nn.LeakyReLU(),
            conv(width, width, kernel, padding=tuple(2 * (k // 2) for k in kernel), dilation=2), nn.LeakyReLU())
        self.head = conv(width, num_classes, 1)
        self.deep_supervision = False

    @property
    def output_heads(self) -> list[nn.Module]:
        return [self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _toy_path(topology: Topology) -> list[Layer]:
    kernel = topology.kernel_sizes[0]
    return [Layer(kernel), Layer(kernel, dilation=(2,) * topology.dim), Layer((1,) * topology.dim)]


TOY = NetworkFamily(
    name="toy", description="a family registered by a test: conv, dilated conv, head; a single output",
    build=ToyNet, topology=lambda plan: dataclasses.replace(plan, features_per_stage=(4,) * plan.n_stages),
    path=_toy_path, deep_supervision=False, upsampling=False)


@pytest.fixture()
def toy() -> Iterator[NetworkFamily]:
    family = register(TOY)
    yield family
    NETWORKS.remove(TOY.name)


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, f"{args}: {result.output}"
    return result.output


def test_a_family_registered_in_a_test_runs_the_whole_pipeline(toy: NetworkFamily, roots: Path) -> None:
    _ok(["example-dataset", "--cases", "4", "--size", "24"])
    _ok(["plan", "900", "-j", "1"])
    planned = _ok(["plan", "900", "-j", "1", "--network", "toy"])
    preprocessed = roots / "preprocessed" / "Dataset900_Example"
    assert "toy" in planned and (preprocessed / "plans__toy.json").is_file()
    listed = _ok(["plan", "900", "--network", "list"])
    assert listed == _ok(["networks", "900"])
    typo = runner.invoke(app, ["plan", "900", "--network", "unet", "--upsampling", "pixelshuffle"])
    assert typo.exit_code == 2 and "pixel_shuffle" in typo.output
    toy_line = next(line for line in listed.splitlines() if line.startswith("toy "))
    assert "receptive field 7x7x7 voxels" in toy_line and {"unet", "resenc"} <= {
        line.split()[0] for line in listed.splitlines() if line.strip()}
    _ok(["preprocess", "900", "-j", "1"])
    cases = sorted((preprocessed / "autoseg_3d_fullres").glob("*.json"))
    stamps = [path.stat().st_mtime_ns for path in cases]
    _ok(["preprocess", "900", "-j", "1", "-p", "toy"])
    assert [path.stat().st_mtime_ns for path in cases] == stamps  # the same cache, nothing redone
    assert sorted(p.name for p in preprocessed.iterdir() if p.is_dir()) == ["autoseg_3d_fullres"]
    _ok(["train", "900", "3d_fullres", "0", "-p", "toy", "--epochs", "1", "--iterations-per-epoch", "2",
         "--val-iterations", "1", "-j", "0"])
    folder = roots / "results" / "Dataset900_Example" / "3d_fullres__toy"
    assert json.loads((folder / "fold_0" / "training.json").read_text())["deep_supervision"] is False
    assert (folder / "fold_0" / "validation" / "summary.json").is_file()
    raw = roots / "raw" / "Dataset900_Example"
    _ok(["predict", "-i", str(raw / "imagesTs"), "-o", str(roots / "pred"), "-d", "900", "-p", "toy", "-f", "0",
         "--no-tta"])
    assert len(list((roots / "pred").glob("*.nii.gz"))) == 2
    missing = runner.invoke(app, ["train", "900", "3d_fullres", "0", "-p", "resenc"])
    assert missing.exit_code == 2 and "--network resenc" in missing.output
