"""Scratch left by killed runs is removed by the next run; scratch of running processes is kept (issue 19)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from autoseg.runtime.scratch import pid_alive, scratch_folder


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_scratch_folders_of_killed_runs_are_removed_and_the_running_ones_kept() -> None:
    root = Path(tempfile.gettempdir())
    dead, alive = _dead_pid(), os.getppid()
    assert not pid_alive(dead) and pid_alive(alive)
    stale = root / f"autoseg-test-{dead}-abc"
    running = root / f"autoseg-test-{alive}-def"
    for folder in (stale, running):
        (folder / "model").mkdir(parents=True, exist_ok=True)
    try:
        with scratch_folder("autoseg-test") as mine:
            assert mine.is_dir() and mine.name.startswith(f"autoseg-test-{os.getpid()}-")
            assert not stale.exists() and running.is_dir()
        assert not mine.exists()
    finally:
        for folder in (stale, running):
            if folder.exists():
                shutil.rmtree(folder)


def test_a_probability_scratch_file_of_a_killed_run_is_removed(tmp_path: Path) -> None:
    from autoseg.inference.probability_file import SCRATCH_PID
    from autoseg.runtime.scratch import remove_stale

    stale = tmp_path / f".case.npz.{_dead_pid()}.scratch"
    kept = tmp_path / f".other.npz.{os.getppid()}.scratch"
    for path in (stale, kept):
        path.write_bytes(b"x")
    assert remove_stale(tmp_path.glob(".*.scratch"), SCRATCH_PID) == [stale]
    assert kept.exists() and not stale.exists()
