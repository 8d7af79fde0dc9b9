"""Training loop on the synthetic example (CPU): learning, exact resume, extension, checkpoints, DDP."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoseg.dataset.load import load_dataset
from autoseg.errors import SettingsError
from autoseg.fingerprint import extract_fingerprint
from autoseg.model_folder import CheckpointError, ModelFolder, load_checkpoint
from autoseg.paths import DatasetLocation
from autoseg.planning import plan
from autoseg.preprocessing.run import preprocess_dataset
from autoseg.runtime.distributed import RuntimeContext
from autoseg.serialization import save_contract
from autoseg.training import loop as loop_module
from autoseg.training.job import fold_run, resolve_settings
from autoseg.training.loop import TrainingStopped, train_fold
from autoseg.training.progress import read_metrics
from autoseg.training.settings import TrainingSettings

SMALL = TrainingSettings(epochs=4, iterations_per_epoch=3, val_iterations=2, workers=0, checkpoint_every=2,
                         initial_lr=0.01, seed=3)


@pytest.fixture(scope="module")
def prepared(small_training_setup):
    """The example dataset planned and preprocessed, and a shrunken network so tests run in seconds."""
    return small_training_setup


def _run(prepared, results: Path, fold: int = 0):
    dataset, plans, location, root = prepared
    os.environ["AUTOSEG_PREPROCESSED"] = str(root / "pre")
    os.environ["AUTOSEG_RESULTS"] = str(results)
    return fold_run(location, dataset, plans, "3d_fullres", fold)


def _weights(run, name: str = "final") -> dict[str, torch.Tensor]:
    return load_checkpoint(run.folder.checkpoint(run.fold, name))["network"]


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AUTOSEG_PREPROCESSED", "AUTOSEG_RESULTS"):
        monkeypatch.setenv(name, os.environ.get(name, ""))


def test_training_lowers_the_loss_and_writes_records(prepared, tmp_path: Path) -> None:
    run = _run(prepared, tmp_path)
    settings = dataclasses.replace(SMALL, epochs=6, iterations_per_epoch=4, initial_lr=0.02)
    state = train_fold(run, settings, RuntimeContext(device=torch.device("cpu")))
    records = read_metrics(run.folder.fold_dir(0) / "metrics.jsonl")
    assert state.epoch == 6 and [r["epoch"] for r in records] == list(range(6))
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["lr"] < records[0]["lr"]
    assert set(records[-1]["pseudo_dice"]) == {"organ", "lesion"}
    for record in records:  # what `autoseg compare` reads: training-step seconds and the measured peak memory
        assert record["iterations"] == 4 and 0 < record["train_seconds"] <= record["epoch_seconds"]
        assert record["memory_kind"] == "cpu_rss" and 0.05 < record["peak_memory_gib"] < 24
    for name in ("final", "latest", "best"):
        assert run.folder.checkpoint(0, name).is_file()
    assert (run.folder.fold_dir(0) / "progress.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def straight(prepared, tmp_path_factory: pytest.TempPathFactory):
    """SMALL trained without interruption: what every interrupted-then-resumed run must end with."""
    run = _run(prepared, tmp_path_factory.mktemp("straight"))
    train_fold(run, SMALL, RuntimeContext(device=torch.device("cpu")))
    return run


def _assert_same_final_weights(expected, got) -> None:
    for key, value in _weights(expected).items():
        assert torch.equal(value, _weights(got)[key]), key


def test_interrupted_and_resumed_equals_uninterrupted(prepared, straight, tmp_path: Path, monkeypatch) -> None:
    context = RuntimeContext(device=torch.device("cpu"))
    cut = _run(prepared, tmp_path / "cut")
    real_save = loop_module._record_and_save

    def crash_after_third_epoch(run, settings, objects, state, record):
        real_save(run, settings, objects, state, record)
        if state.epoch == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "_record_and_save", crash_after_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_fold(cut, SMALL, context)
    monkeypatch.setattr(loop_module, "_record_and_save", real_save)
    assert load_checkpoint(cut.folder.checkpoint(0, "latest"))["epoch"] == 2
    train_fold(cut, SMALL, context, resume=True)
    _assert_same_final_weights(straight, cut)
    epochs = [r["epoch"] for r in read_metrics(cut.folder.fold_dir(0) / "metrics.jsonl")]
    assert epochs == [0, 1, 2, 3]


def test_a_stop_signal_finishes_the_epoch_saves_and_resumes_exactly(prepared, straight, tmp_path: Path,
                                                                    monkeypatch) -> None:
    context = RuntimeContext(device=torch.device("cpu"))
    stopped = _run(prepared, tmp_path / "stopped")
    real_validate = loop_module._validate

    def signal_during_third_epoch(run, settings, context, objects, loader):
        if len(read_metrics(run.folder.fold_dir(0) / "metrics.jsonl")) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM's --signal sends before the time limit
        return real_validate(run, settings, context, objects, loader)

    monkeypatch.setattr(loop_module, "_validate", signal_during_third_epoch)
    previous_handler = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(TrainingStopped, match="SIGUSR1 after epoch 3/4") as err:
        train_fold(stopped, SMALL, context)
    assert signal.getsignal(signal.SIGUSR1) == previous_handler  # handlers restored
    assert "--continue" in err.value.hint and err.value.path == str(stopped.folder.checkpoint(0, "latest"))
    assert load_checkpoint(stopped.folder.checkpoint(0, "latest"))["epoch"] == 3  # the epoch was finished
    monkeypatch.setattr(loop_module, "_validate", real_validate)
    train_fold(stopped, SMALL, context, resume=True)
    _assert_same_final_weights(straight, stopped)


def test_continue_with_more_epochs_extends_a_finished_run(prepared, tmp_path: Path) -> None:
    context = RuntimeContext(device=torch.device("cpu"))
    run = _run(prepared, tmp_path)
    short = dataclasses.replace(SMALL, epochs=2)
    train_fold(run, short, context)
    again = train_fold(run, short, context, resume=True)
    assert again.epoch == 2  # nothing to do
    extended = train_fold(run, dataclasses.replace(SMALL, epochs=3), context, resume=True)
    assert extended.epoch == 3
    records = read_metrics(run.folder.fold_dir(0) / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[2]["lr"] == pytest.approx(0.01 * (1 - 2 / 3) ** 0.9)


def test_corrupt_and_incompatible_checkpoints_are_clear_errors(prepared, tmp_path: Path) -> None:
    run = _run(prepared, tmp_path)
    path = run.folder.checkpoint(0, "latest")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        train_fold(run, SMALL, RuntimeContext(device=torch.device("cpu")), resume=True)
    assert err.value.path == str(path) and "retrain" in err.value.hint
    torch.save({"network": {"w": torch.zeros(1)}, "optimizer": {}, "scaler": {}, "epoch": 1, "total_epochs": 4,
                "ema_dice": None, "best_ema_dice": None, "torch_rng": torch.get_rng_state()}, path)
    with pytest.raises(CheckpointError, match="does not fit"):
        train_fold(run, SMALL, RuntimeContext(device=torch.device("cpu")), resume=True)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    assert ModelFolder(tmp_path).folds() == ()


def _planned_example(root: Path, name: str, seed: int) -> dict[str, str]:
    """A 5-case example dataset `name` (DatasetNNN_X) planned and preprocessed under `root` by the CLI; the
    environment that points autoseg at it (one thread per process)."""
    from autoseg.dataset.synthetic import make_example_dataset

    make_example_dataset(root / "raw" / name, n_cases=5, size=24, seed=seed)
    env = dict(os.environ, AUTOSEG_RAW=str(root / "raw"), AUTOSEG_PREPROCESSED=str(root / "pre"),
               AUTOSEG_RESULTS=str(root / "res"), OMP_NUM_THREADS="1")
    number = name[len("Dataset"):len("Dataset") + 3]
    for command in (["plan", number, "-j", "1"], ["preprocess", number, "-j", "1"]):
        subprocess.run([sys.executable, "-m", "autoseg", *command], env=env, check=True, capture_output=True)
    return env


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_ddp_on_cpu_keeps_replicas_identical(tmp_path: Path) -> None:
    env = _planned_example(tmp_path, "Dataset960_Ddp", seed=1)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
              "-m", "autoseg", "train", "960", "3d_fullres", "0", "--epochs", "1", "--iterations-per-epoch", "2",
              "--val-iterations", "1", "-j", "0", "--device", "cpu"]
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "res" / "Dataset960_Ddp" / "3d_fullres__autoseg" / "fold_0"
    assert (folder / "checkpoint_final.pt").is_file()
    assert "2 process(es)" in (folder / "training.log").read_text()


@pytest.mark.slow
@pytest.mark.ddp
def test_two_nodes_on_one_machine_meet_at_a_c10d_rendezvous_and_stay_identical(tmp_path: Path) -> None:
    """Issue 18: what slurm_multinode.sbatch does, with two torchrun agents on localhost (gloo, one process
    each): the run must see 2 processes, finish, and pass the trainer's end-of-run replica check (the ranks'
    weights compared by checksum; a mismatch raises)."""
    import socket

    env = _planned_example(tmp_path, "Dataset961_Nodes", seed=2)
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "autoseg-test",
         *(["--rdzv_conf", "is_host=true"] if rank == 0 else ["--rdzv_conf", "is_host=false"]),
         "-m", "autoseg", "train", "961", "3d_fullres", "0", "--epochs", "1", "--iterations-per-epoch", "2",
         "--val-iterations", "1", "-j", "0", "--device", "cpu", "--no-validate"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    results = [agent.communicate(timeout=600) for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(err[-2000:] for _, err in results)
    folder = tmp_path / "res" / "Dataset961_Nodes" / "3d_fullres__autoseg" / "fold_0"
    assert (folder / "checkpoint_final.pt").is_file()
    assert "2 process(es)" in (folder / "training.log").read_text()


def test_allocator_tuning_is_safe_to_call() -> None:
    import platform

    from autoseg.runtime.device import keep_freed_memory

    applied = keep_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied
    assert torch.ones(1000, 1000).sum().item() == 1_000_000


def test_two_d_configuration_trains_on_slices(example_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    dataset = load_dataset(example_dataset)
    plans = plan(extract_fingerprint(dataset), dataset)
    config = plans.configurations["2d"]
    small = dataclasses.replace(config, topology=dataclasses.replace(
        config.topology, features_per_stage=(4, 8, 8, 8, 8, 8)[: config.topology.n_stages]), batch_size=4)
    plans = dataclasses.replace(plans, configurations={"2d": small})
    preprocess_dataset(dataset, plans, ["2d"], out_root=tmp_path / "pre" / dataset.name)
    monkeypatch.setenv("AUTOSEG_PREPROCESSED", str(tmp_path / "pre"))
    monkeypatch.setenv("AUTOSEG_RESULTS", str(tmp_path / "res"))
    location = DatasetLocation(name=dataset.name, raw=Path(dataset.root))
    run = fold_run(location, dataset, plans, "2d", 1)
    settings = dataclasses.replace(SMALL, epochs=1)
    assert train_fold(run, settings, RuntimeContext(device=torch.device("cpu"))).epoch == 1
    weights = _weights(run)
    assert all(w.ndim in (1, 4) for w in weights.values())  # 2D convolutions


def test_resumed_settings_are_the_folds_own_and_resize_the_worker_pool(tmp_path: Path) -> None:
    folder = ModelFolder(tmp_path / "3d_fullres__autoseg")
    save_contract(folder.settings_file, TrainingSettings(epochs=7, workers=3))  # the latest run: fold 1's
    save_contract(folder.fold_settings_file(0), TrainingSettings(epochs=5, seed=1, workers=16))
    resumed = resolve_settings(folder, {"epochs": 9}, resume=True, fold=0)
    assert (resumed.epochs, resumed.seed, resumed.workers) == (9, 1, None)  # fold 0's seed; workers sized afresh
    assert resolve_settings(folder, {"workers": 2}, resume=True, fold=0).workers == 2
    assert resolve_settings(folder, {}, resume=True, fold=2).epochs == 7  # no own file: the folder's (older runs)
    assert resolve_settings(folder, {}, resume=False, fold=0) == TrainingSettings()


def test_a_fresh_start_moves_the_previous_run_aside(prepared, tmp_path: Path, monkeypatch) -> None:
    """Issue 19 D3: training a trained fold again from scratch, then interrupting it, must not let --continue
    resume the old run, nor mix the two runs' records."""
    context = RuntimeContext(device=torch.device("cpu"))
    run = _run(prepared, tmp_path)
    train_fold(run, dataclasses.replace(SMALL, epochs=2), context)
    real_save = loop_module._record_and_save

    def crash_after_first_epoch(run, settings, objects, state, record):
        real_save(run, settings, objects, state, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "_record_and_save", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_fold(run, dataclasses.replace(SMALL, epochs=2, checkpoint_every=1), context)
    fold_dir = run.folder.fold_dir(0)
    kept, = fold_dir.glob("previous_run_*")
    assert load_checkpoint(kept / "checkpoint_final.pt")["epoch"] == 2
    assert [r["epoch"] for r in read_metrics(kept / "metrics.jsonl")] == [0, 1]
    assert not run.folder.checkpoint(0, "final").exists()  # only the new run's epoch-1 checkpoints are here
    assert load_checkpoint(run.folder.checkpoint(0, "latest"))["epoch"] == 1
    assert [r["epoch"] for r in read_metrics(fold_dir / "metrics.jsonl")] == [0]
    monkeypatch.setattr(loop_module, "_record_and_save", real_save)
    stale = fold_dir / ".checkpoint_latest.pt.x1y2.tmp"  # what kill -9 during a save leaves (issue 19 L2)
    stale.write_bytes(b"half a checkpoint")
    train_fold(run, dataclasses.replace(SMALL, epochs=2, checkpoint_every=1), context, resume=True)
    assert not stale.exists() and load_checkpoint(run.folder.checkpoint(0, "final"))["epoch"] == 2
    assert [r["epoch"] for r in read_metrics(fold_dir / "metrics.jsonl")] == [0, 1]  # the new run's only


def test_bf16_training_on_cpu_runs_and_is_recorded(prepared, tmp_path: Path) -> None:
    """--precision bf16: autocast in every step on CPU (issue 16); the setting round-trips through training.json."""
    from autoseg.runtime.device import precision_dtype
    from autoseg.serialization import load_contract

    run = _run(prepared, tmp_path)
    settings = dataclasses.replace(SMALL, epochs=1, precision="bf16")
    context = RuntimeContext(device=torch.device("cpu"), amp_dtype=precision_dtype(torch.device("cpu"), "bf16"))
    train_fold(run, settings, context)
    record, = read_metrics(run.folder.fold_dir(0) / "metrics.jsonl")
    assert record["train_loss"] == record["train_loss"] and record["train_loss"] < 10  # finite
    save_contract(tmp_path / "training.json", settings)
    assert load_contract(tmp_path / "training.json", TrainingSettings, rerun="-").precision == "bf16"
    with pytest.raises(SettingsError, match="--precision"):
        dataclasses.replace(SMALL, precision="fp16").validated()
