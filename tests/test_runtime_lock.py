"""Folder locks: a second run of the same job fails at once naming the first; a killed run leaves no lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoseg.errors import SettingsError
from autoseg.runtime.lock import LOCK_NAME, folder_lock

HOLD = ("import sys, time; from autoseg.runtime.lock import folder_lock\n"
        "with folder_lock(sys.argv[1], 'the job'):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n")


def test_a_second_holder_is_refused_with_the_first_ones_pid_and_the_lock_is_released(tmp_path: Path) -> None:
    with folder_lock(tmp_path / "job", "training of fold 0"):
        with pytest.raises(SettingsError, match=rf"training of fold 0 is already running \(pid {os.getpid()}"):
            with folder_lock(tmp_path / "job", "training of fold 0"):
                pass
    with folder_lock(tmp_path / "job", "training of fold 0"):  # released on exit
        assert f"pid {os.getpid()}" in (tmp_path / "job" / LOCK_NAME).read_text()


def test_a_run_killed_with_sigkill_does_not_block_the_next(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SettingsError, match=f"pid {holder.pid}"):
            with folder_lock(tmp_path, "the job"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    started = time.monotonic()
    with folder_lock(tmp_path, "the job"):
        assert time.monotonic() - started < 5


def test_preprocessing_and_training_take_their_folders_lock(small_training_setup, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19 D4/C2: a preprocess or train of the same cache / fold while one runs gives a clear error."""
    from autoseg.preprocessing.run import preprocess_dataset
    from autoseg.training.job import train_one_fold

    dataset, plans, location, root = small_training_setup
    cache = root / "pre" / dataset.name / plans.configurations["3d_fullres"].data_id
    with folder_lock(cache, "another preprocessing"):
        with pytest.raises(SettingsError, match="already running"):
            preprocess_dataset(dataset, plans, ["3d_fullres"], out_root=root / "pre" / dataset.name)
    monkeypatch.setenv("AUTOSEG_PREPROCESSED", str(root / "pre"))
    monkeypatch.setenv("AUTOSEG_RESULTS", str(tmp_path))
    fold_dir = tmp_path / dataset.name / "3d_fullres__autoseg" / "fold_0"
    with folder_lock(fold_dir, "another training"):
        with pytest.raises(SettingsError, match="training of 3d_fullres__autoseg fold 0 is already running"):
            train_one_fold(location, dataset, plans, "3d_fullres", 0, overrides={"epochs": 1}, device="cpu",
                           resume=False)


def test_parts_run_side_by_side_but_not_twice_and_not_beside_the_whole_job(tmp_path: Path) -> None:
    from autoseg.runtime.lock import part_lock
    from autoseg.runtime.parts import Part

    with part_lock(tmp_path, "preprocessing", Part(1, 2)), part_lock(tmp_path, "preprocessing", Part(2, 2)):
        with pytest.raises(SettingsError, match=r"preprocessing, part 1/2 is already running \(pid"):
            with part_lock(tmp_path, "preprocessing", Part(1, 2)):
                pass
        with pytest.raises(SettingsError, match="preprocessing is already running"):
            with part_lock(tmp_path, "preprocessing", Part()):
                pass
    with part_lock(tmp_path, "preprocessing", Part()):  # every part released
        with pytest.raises(SettingsError, match="preprocessing is already running"):
            with part_lock(tmp_path, "preprocessing", Part(2, 2)):
                pass
