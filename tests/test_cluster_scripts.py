"""The cluster recipes: SLURM scripts run by bash with stub `autoseg`, `torchrun`, `srun` and `scontrol`
commands that record how they were called (no SLURM in CI), and the cluster guide's links."""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


@functools.cache
def _cli_options() -> dict[str, set[str]]:
    """Every option of every `autoseg` command, from the CLI itself (no torch import)."""
    import typer

    from autoseg.cli import app

    group = typer.main.get_command(app)
    return {name: {opt for p in cmd.params for opt in (*p.opts, *getattr(p, "secondary_opts", ())) if
                   opt.startswith("-")} for name, cmd in group.commands.items()}  # type: ignore[attr-defined]


# ---------------------------------------------------------------- SLURM scripts


def _sbatch_directives(path: Path) -> dict[str, str]:
    """#SBATCH options up to the first command (where sbatch stops reading them)."""
    directives = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH "):
            key, _, value = line.removeprefix("#SBATCH ").strip().partition("=")
            directives[key] = value
    return directives


@pytest.fixture()
def stubs(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A bin folder of recording stubs and a clean environment that puts it first on PATH."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    record = 'printf "%s\\n" "$@" > "$STUB_LOG/$(basename "$0").args"\n'
    block = 'if [[ -n "${STUB_BLOCK:-}" ]]; then while [[ ! -e "$STUB_BLOCK" ]]; do sleep 0.05; done; fi\n'
    # like autoseg train: on USR1 finish the epoch (a moment), save, exit
    usr1 = 'trap \'sleep 0.3; touch "$STUB_LOG/$(basename "$0").saved"; exit 2\' USR1\n'
    bodies = {
        "autoseg": record + usr1 + block,
        "torchrun": record,
        "srun": record + 'while [[ "$1" == -* ]]; do shift; done\nexec "$@"\n',
        # a long host list, as on a big allocation: a reader that stops early would SIGPIPE it
        "scontrol": 'if [[ "$1" == show ]]; then printf "gpu017\\ngpu018\\n"; seq -f "node%05g" 100000; '
                    'else echo "$@" $(ls "$STUB_LOG" | grep -c saved) >> "$STUB_LOG/scontrol"; fi\n',
    }
    for name, body in bodies.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "AUTOSEG_", "nnUNet_")) and k not in {"CUDA_VISIBLE_DEVICES", "LAUNCHER"}}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", STUB_LOG=str(log),
               AUTOSEG_RESULTS=str(tmp_path / "results"), SLURM_JOB_ID="777")
    return log, env


def _run(script: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def _check_train_call(argv: list[str]) -> None:
    start = argv.index("train")
    unknown = [a for a in argv[start:] if a.startswith("-") and a not in _cli_options()["train"]]
    assert not unknown, f"autoseg train has no option {unknown}"


@needs_bash
@pytest.mark.parametrize("script", ["slurm_folds.sbatch", "slurm_multigpu.sbatch", "slurm_multinode.sbatch"])
def test_slurm_scripts_are_valid_executable_bash(script: str) -> None:
    path = SCRIPTS / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    directives = _sbatch_directives(path)
    assert "--requeue" in directives and directives["--signal"].startswith("B:USR1@")
    assert directives["--gres"].startswith("gpu:") and int(directives["--cpus-per-task"]) >= 2
    assert (SCRIPTS / "autoseg.def").is_file()


def test_folds_script_is_a_five_task_array_on_one_gpu_each() -> None:
    directives = _sbatch_directives(SCRIPTS / "slurm_folds.sbatch")
    assert directives["--array"] == "0-4"
    assert directives["--gres"] == "gpu:1"
    text = (SCRIPTS / "slurm_folds.sbatch").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"(^|\s)(-j|--workers)(\s+|=)\d", code), "worker counts must follow the allotted CPUs"


@needs_bash
def test_folds_script_trains_the_array_tasks_fold_with_continue(stubs) -> None:
    log, env = stubs
    result = _run("slurm_folds.sbatch", [], {**env, "SLURM_ARRAY_TASK_ID": "3", "SLURM_CPUS_PER_TASK": "12"})
    assert result.returncode == 0, result.stderr
    argv = (log / "autoseg.args").read_text().splitlines()
    assert argv == ["train", "4", "3d_fullres", "3", "--continue"]  # defaults; no worker count
    result = _run("slurm_folds.sbatch", ["900", "2d", "--epochs", "5"], {**env, "SLURM_ARRAY_TASK_ID": "0"})
    assert result.returncode == 0, result.stderr
    argv = (log / "autoseg.args").read_text().splitlines()
    assert argv == ["train", "900", "2d", "0", "--continue", "--epochs", "5"]
    _check_train_call(argv)
    assert _run("slurm_folds.sbatch", [], env).returncode == 2  # outside a job array


@needs_bash
def test_folds_script_runs_autoseg_through_a_launcher(stubs) -> None:
    log, env = stubs
    result = _run("slurm_folds.sbatch", ["4"], {**env, "SLURM_ARRAY_TASK_ID": "1", "LAUNCHER": "srun --exclusive"})
    assert result.returncode == 0, result.stderr
    assert (log / "srun.args").read_text().splitlines()[:3] == ["--exclusive", "autoseg", "train"]
    assert (log / "autoseg.args").read_text().splitlines()[3] == "1"


def _usr1_before_the_time_limit(script: str, env: dict[str, str], tmp_path: Path, *, ready: Path) -> str:
    """Start `script`, send it USR1 (what --signal=B:USR1@600 sends) once `ready` exists; its stderr."""
    release = tmp_path / "release"  # the stubs train until this file exists
    process = subprocess.Popen(["bash", str(SCRIPTS / script)], env={**env, "STUB_BLOCK": str(release)},
                               stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(ready.is_file)
        time.sleep(0.3)  # the stub sets its trap
        process.send_signal(signal.SIGUSR1)
        _, stderr = process.communicate(timeout=30)
    finally:
        release.touch()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    return stderr


@needs_bash
def test_folds_script_lets_autoseg_save_then_requeues_before_the_time_limit(stubs, tmp_path: Path) -> None:
    log, env = stubs
    env = {**env, "SLURM_ARRAY_TASK_ID": "2"}
    stderr = _usr1_before_the_time_limit("slurm_folds.sbatch", env, tmp_path, ready=log / "autoseg.args")
    assert (log / "autoseg.saved").is_file(), "USR1 must reach autoseg so that it saves"
    assert (log / "scontrol").read_text().split() == ["requeue", "777", "1"], "requeued only after the save"
    assert "requeueing job 777" in stderr


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@needs_bash
def test_multigpu_script_runs_torchrun_with_one_share_of_cpus_per_gpu(stubs) -> None:
    log, env = stubs
    result = _run("slurm_multigpu.sbatch", ["4", "3d_fullres", "2"],
                  {**env, "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32"})
    assert result.returncode == 0, result.stderr
    argv = (log / "torchrun.args").read_text().splitlines()
    assert argv == ["--standalone", "--nproc_per_node", "4", "-m", "autoseg", "train", "4", "3d_fullres", "2",
                    "--continue", "-j", "7"]
    _check_train_call(argv)
    result = _run("slurm_multigpu.sbatch", [], {**env, "CUDA_VISIBLE_DEVICES": "0,1", "SLURM_CPUS_PER_TASK": "2"})
    assert result.returncode == 0, result.stderr
    argv = (log / "torchrun.args").read_text().splitlines()
    assert argv[argv.index("--nproc_per_node") + 1] == "2" and argv[-2:] == ["-j", "1"]


@needs_bash
def test_multigpu_script_passes_usr1_to_the_training_processes_not_torchrun(stubs, tmp_path: Path) -> None:
    log, env = stubs
    rank = ('bash -c \'trap "sleep 0.3; touch $STUB_LOG/rank.saved; exit 2" USR1; '
            'while [[ ! -e "$STUB_BLOCK" ]]; do sleep 0.05; done\' &\nwait $!\n')
    (log.parent / "bin" / "torchrun").write_text('#!/usr/bin/env bash\ntouch "$STUB_LOG/torchrun.started"\n' + rank)
    env = {**env, "SLURM_GPUS_ON_NODE": "2", "SLURM_CPUS_PER_TASK": "4"}
    _usr1_before_the_time_limit("slurm_multigpu.sbatch", env, tmp_path, ready=log / "torchrun.started")
    assert (log / "rank.saved").is_file()
    assert (log / "scontrol").read_text().split() == ["requeue", "777", "1"]


@needs_bash
def test_multinode_script_meets_at_a_rendezvous_on_the_first_node(stubs) -> None:
    log, env = stubs
    result = _run("slurm_multinode.sbatch", ["4", "3d_fullres", "1"], {
        **env, "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4",
        "SLURM_CPUS_PER_TASK": "16"})
    assert result.returncode == 0, result.stderr
    srun = (log / "srun.args").read_text().splitlines()
    assert "--ntasks-per-node=1" in srun and "--cpus-per-task=16" in srun
    argv = (log / "torchrun.args").read_text().splitlines()
    flags = dict(zip(argv[:argv.index("-m"):2], argv[1:argv.index("-m"):2]))
    assert flags == {"--nnodes": "2", "--nproc_per_node": "4", "--rdzv_id": "777", "--rdzv_backend": "c10d",
                     "--rdzv_endpoint": "gpu017:29500"}
    assert argv[argv.index("-m"):] == ["-m", "autoseg", "train", "4", "3d_fullres", "1", "--continue", "-j", "3"]
    _check_train_call(argv)


# ---------------------------------------------------------------- the guide


def test_cluster_guide_links_and_scripts_exist() -> None:
    guide = ROOT / "docs" / "cluster.md"
    text = guide.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert (guide.parent / target).is_file(), f"broken link {target}"
            assert (guide.parent / target).resolve().is_relative_to(ROOT / "docs"), "mkdocs only sees docs/"
    for script in set(re.findall(r"scripts/[\w.-]+", text)):
        assert (ROOT / script).is_file(), f"docs/cluster.md names a missing {script}"
    assert "--continue" in text and "find-best" in text and "torchrun" in text


# ---------------------------------------------------------------- split prediction and preprocessing (--part)


@needs_bash
@pytest.mark.parametrize("script", ["slurm_predict.sbatch", "slurm_preprocess.sbatch"])
def test_split_scripts_are_requeueable_arrays(script: str) -> None:
    path = SCRIPTS / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    directives = _sbatch_directives(path)
    assert "--requeue" in directives and re.fullmatch(r"\d+-\d+", directives["--array"])
    assert ("--gres" in directives) == (script == "slurm_predict.sbatch")  # preprocessing needs no GPU


@needs_bash
@pytest.mark.parametrize("array", [("0", "0", "4"), ("3", "0", "4"), ("1", "1", "8"), ("8", "1", "8"),
                                   ("12", "10", "3")])
def test_each_array_task_runs_its_own_part_and_the_parts_cover_the_array(stubs, array) -> None:
    from autoseg.runtime.parts import Part

    log, env = stubs
    task, first, count = array
    slurm = {**env, "SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_MIN": first, "SLURM_ARRAY_TASK_COUNT": count,
             "SLURM_CPUS_PER_TASK": "6"}
    expected = f"{int(task) - int(first) + 1}/{count}"
    Part.parse(expected)  # a part that exists
    result = _run("slurm_predict.sbatch", ["scans", "seg", "-d", "4", "--no-tta"], slurm)
    assert result.returncode == 0, result.stderr
    argv = (log / "autoseg.args").read_text().splitlines()
    assert argv == ["predict", "-i", "scans", "-o", "seg", "--part", expected, "-d", "4", "--no-tta"]
    assert not [a for a in argv[1:] if a.startswith("-") and a not in _cli_options()["predict"]]
    result = _run("slurm_preprocess.sbatch", ["4", "-c", "3d_fullres"], slurm)
    assert result.returncode == 0, result.stderr
    argv = (log / "autoseg.args").read_text().splitlines()
    assert argv == ["preprocess", "4", "--part", expected, "-j", "6", "-c", "3d_fullres"]
    assert not [a for a in argv[1:] if a.startswith("-") and a not in _cli_options()["preprocess"]]


@needs_bash
def test_split_scripts_refuse_to_run_outside_an_array_or_without_arguments(stubs) -> None:
    log, env = stubs
    assert "INPUT OUTPUT" in _run("slurm_predict.sbatch", ["only-input"], {**env, "SLURM_ARRAY_TASK_ID": "1"}).stderr
    outside = _run("slurm_preprocess.sbatch", ["4"], env)
    assert outside.returncode == 2 and "job array" in outside.stderr and not (log / "autoseg.args").exists()
