"""Output initialisation (class prior vs nnU-Net's He init), LR warm-up and the settings that choose them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoseg.errors import SettingsError
from autoseg.model.build import build_network
from autoseg.model_folder import ModelFolder
from autoseg.runtime.distributed import RuntimeContext
from autoseg.serialization import load_contract, save_contract
from autoseg.training.data import make_loader
from autoseg.training.init import (
    FREQUENCY_SEED_OFFSET,
    MIN_FREQUENCY,
    OUTPUT_INITS,
    patch_class_frequencies,
    prior_bias,
)
from autoseg.training.job import fold_run, resolve_settings
from autoseg.training.loop import train_fold
from autoseg.training.settings import TrainingSettings, warmup_factor
from autoseg.training.setup import build_training_objects


@pytest.fixture(scope="module")
def prepared(small_training_setup):
    """The example dataset planned and preprocessed, and a shrunken network so tests run in seconds."""
    return small_training_setup


@pytest.fixture()
def run(prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    dataset, plans, location, root = prepared
    monkeypatch.setenv("AUTOSEG_PREPROCESSED", str(root / "pre"))
    monkeypatch.setenv("AUTOSEG_RESULTS", str(tmp_path))
    return fold_run(location, dataset, plans, "3d_fullres", 0)


CPU = RuntimeContext(device=torch.device("cpu"))


def _frequencies(run, seed: int) -> np.ndarray:
    return patch_class_frequencies(run.cache, run.train_ids, run.config, num_classes=run.num_classes,
                                   batch_size=run.config.batch_size, oversample=0.33,
                                   seed=seed + FREQUENCY_SEED_OFFSET)


def test_prior_heads_start_at_the_patch_class_frequencies(run) -> None:
    network = build_training_objects(run, TrainingSettings(seed=5, init="prior"), CPU).network
    frequencies = _frequencies(run, 5)
    assert frequencies.sum() == pytest.approx(1.0) and (frequencies > 0).all()
    for head in network.output_heads:  # a voxel whose features are 0 gets exactly the prior
        np.testing.assert_allclose(head.bias.detach().softmax(0).numpy(), frequencies, rtol=1e-5)


def test_prior_zero_output_reproduces_the_frequencies_at_every_voxel(run) -> None:
    network = build_training_objects(run, TrainingSettings(seed=5, init="prior_zero"), CPU).network.eval()
    frequencies = _frequencies(run, 5)
    batch = next(iter(make_loader(run.cache, run.train_ids, run.config, workers=0, seed=1)))
    with torch.no_grad():
        outputs = network(torch.from_numpy(batch["data"]))
    assert len(outputs) == run.config.topology.n_stages - 1
    for logits in outputs:  # every head, every voxel, whatever the input
        probabilities = logits.softmax(1).movedim(1, -1).reshape(-1, run.num_classes)
        np.testing.assert_allclose(probabilities.numpy(), np.broadcast_to(frequencies, probabilities.shape),
                                   rtol=1e-5, atol=1e-6)


def test_prior_puts_the_start_closer_to_the_frequencies_than_he_init(run) -> None:
    batch = torch.from_numpy(next(iter(make_loader(run.cache, run.train_ids, run.config, workers=0, seed=2)))["data"])
    frequencies = _frequencies(run, 6)
    gaps = {}
    for init in ("nnunet", "prior"):
        network = build_training_objects(run, TrainingSettings(seed=6, init=init), CPU).network.eval()
        with torch.no_grad():
            mean = network(batch)[0].softmax(1).mean((0, 2, 3, 4)).numpy()
        gaps[init] = np.abs(mean - frequencies).sum()
    assert gaps["prior"] < gaps["nnunet"]


def test_frequencies_count_what_the_loader_draws(run) -> None:
    frequencies = patch_class_frequencies(run.cache, run.train_ids, run.config, num_classes=run.num_classes,
                                          batch_size=2, oversample=1.0, seed=0)
    none = patch_class_frequencies(run.cache, run.train_ids, run.config, num_classes=run.num_classes,
                                   batch_size=2, oversample=0.0, seed=0)
    assert frequencies[1:].sum() > none[1:].sum()  # forced foreground patches hold more foreground
    again = patch_class_frequencies(run.cache, run.train_ids, run.config, num_classes=run.num_classes,
                                    batch_size=2, oversample=1.0, seed=0)
    np.testing.assert_array_equal(frequencies, again)  # the same on every DDP rank


def test_nnunet_init_reproduces_the_old_weights_exactly(run) -> None:
    old = build_training_objects(run, TrainingSettings(seed=9, init="nnunet"), CPU).network.state_dict()
    torch.manual_seed(9)
    reference = build_network(run.config.topology, in_channels=run.in_channels, num_classes=run.num_classes)
    assert old.keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(old[name], tensor), name
    prior = build_training_objects(run, TrainingSettings(seed=9, init="prior"), CPU).network.state_dict()
    changed = {name for name in old if not torch.equal(old[name], prior[name])}
    assert changed and all(name.endswith(".head.bias") for name in changed)  # same He draws everywhere else


@given(st.lists(st.floats(1e-6, 1.0), min_size=2, max_size=6))
@settings(max_examples=50, deadline=None)
def test_prior_bias_softmax_is_the_floored_frequencies(raw: list[float]) -> None:
    frequencies = np.asarray(raw) / np.sum(raw)
    bias = prior_bias(frequencies, sigmoid=False)
    floored = np.clip(frequencies, MIN_FREQUENCY, 1 - MIN_FREQUENCY)
    np.testing.assert_allclose(torch.from_numpy(bias).double().softmax(0).numpy(), floored / floored.sum(),
                               rtol=1e-4)
    sigmoid = prior_bias(frequencies, sigmoid=True)
    np.testing.assert_allclose(1 / (1 + np.exp(-sigmoid.astype(np.float64))), floored, rtol=1e-4)


def test_unknown_init_names_the_close_one() -> None:
    with pytest.raises(SettingsError, match="prior"):
        TrainingSettings(init="priors").validated()
    assert {"nnunet", "prior", "prior_zero"} <= set(OUTPUT_INITS)


def test_warmup_factor_ramps_linearly_then_stays_at_one() -> None:
    assert [warmup_factor(i, 4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_warmup_sets_the_learning_rate_of_each_early_step(run, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []
    import autoseg.training.loop as loop_module

    real_step = loop_module.train_step

    def recording_step(network, optimizer, *args, **kwargs):
        seen.append(optimizer.param_groups[0]["lr"])
        return real_step(network, optimizer, *args, **kwargs)

    monkeypatch.setattr(loop_module, "train_step", recording_step)
    settings = TrainingSettings(epochs=2, iterations_per_epoch=3, val_iterations=0, workers=0, warmup_iterations=4,
                                initial_lr=0.01, seed=1)
    train_fold(run, settings, CPU)
    first, second = 0.01, 0.01 * 0.5**0.9  # poly schedule per epoch; warm-up factor per iteration
    expected = [first * 0.25, first * 0.5, first * 0.75, second, second, second]
    np.testing.assert_allclose(seen, expected)


def test_new_settings_round_trip_through_training_json(tmp_path: Path) -> None:
    settings = TrainingSettings(init="nnunet", warmup_iterations=25, batch_dice=True)
    save_contract(tmp_path / "training.json", settings)
    assert load_contract(tmp_path / "training.json", TrainingSettings, rerun="x") == settings


def test_a_run_stored_before_init_and_warmup_continues_as_it_trained(tmp_path: Path) -> None:
    folder = ModelFolder(tmp_path)
    stored = folder.fold_settings_file(0)
    stored.parent.mkdir(parents=True)
    old = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(TrainingSettings(epochs=7)))).items()
           if k not in ("init", "warmup_iterations", "batch_dice")}
    stored.write_text(json.dumps(old))
    resumed = resolve_settings(folder, {}, resume=True, fold=0)
    assert (resumed.init, resumed.warmup_iterations, resumed.epochs) == ("nnunet", 0, 7)
    fresh = resolve_settings(folder, {}, resume=False, fold=0)
    assert fresh.init == TrainingSettings().init


def test_cli_flags_become_settings_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from autoseg import api
    from autoseg.cli import app

    calls: list[dict] = []
    monkeypatch.setattr(api, "train", lambda *args, **kwargs: calls.append(kwargs) or tmp_path)
    result = CliRunner().invoke(app, ["train", "4", "3d_fullres", "0", "--init", "nnunet", "--warmup", "50",
                                      "--sample-dice", "--no-validate"])
    assert result.exit_code == 0, result.output
    assert calls[0]["overrides"] == {"init": "nnunet", "warmup_iterations": 50, "batch_dice": False}
