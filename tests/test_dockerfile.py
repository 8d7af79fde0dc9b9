"""The shipped container recipes: Dockerfile, .dockerignore and the Apptainer recipe.

No Docker engine exists in CI, so the Dockerfile is parsed (continuations joined, comments kept apart)
and its invariants checked. The SLURM scripts are tested in test_cluster_scripts.py.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SCRIPTS = ROOT / "scripts"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


# ---------------------------------------------------------------- a small Dockerfile parser


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # continuation lines joined, comment lines inside them dropped
    line: int  # 1-based line of the keyword

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (ENTRYPOINT ["x"]), None for the shell form."""
        if not self.args.startswith("["):
            return None
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value

    def pairs(self) -> dict[str, str]:
        """KEY=value pairs of ENV / LABEL / ARG (also the legacy `ENV KEY value` form)."""
        tokens = shlex.split(self.args)
        if self.keyword == "ENV" and tokens and "=" not in tokens[0]:
            return {tokens[0]: " ".join(tokens[1:])}
        return dict(token.split("=", 1) if "=" in token else (token, "") for token in tokens)


def parse_dockerfile(text: str) -> tuple[list[Instruction], list[str]]:
    """(instructions, comment lines without their '#'), as Docker reads them: a line ending in a
    backslash continues on the next one, and comment lines never belong to an instruction."""
    instructions: list[Instruction] = []
    comments: list[str] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            comments.append(stripped[1:].removeprefix(" "))
            continue
        if not stripped and not pending:
            continue
        if not pending:
            start = number
        pending.append(raw.rstrip())
        if raw.rstrip().endswith("\\"):
            pending[-1] = pending[-1][:-1]
            continue
        joined = "".join(pending).strip()
        pending = []
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions, comments


def documented_commands(comments: list[str], program: str) -> list[list[str]]:
    """Commands starting with `program` in the comments, continuation lines joined, split like a shell."""
    commands, current = [], ""
    for line in comments:
        text = line.strip()
        if current:
            current += " " + text.rstrip("\\").strip()
        elif text.startswith(program):
            current = text.rstrip("\\").strip()
        if current and not text.endswith("\\"):
            commands.append(shlex.split(current))
            current = ""
    return commands


@pytest.fixture(scope="module")
def dockerfile() -> tuple[list[Instruction], list[str]]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _all(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in instructions if i.keyword == keyword]


def _base_image(instructions: list[Instruction]) -> str:
    """The FROM image with ARG defaults declared before it substituted (FROM ${BASE_IMAGE})."""
    defaults: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ARG":
            defaults.update(instruction.pairs())
        if instruction.keyword == "FROM":
            image = instruction.args.split()[0]
            return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults[m.group(1)], image)
    raise AssertionError("no FROM instruction")


@functools.cache
def _cli_options() -> dict[str, set[str]]:
    """Every option of every `autoseg` command, from the CLI itself (no torch import)."""
    import typer

    from autoseg.cli import app

    group = typer.main.get_command(app)
    return {name: {opt for p in cmd.params for opt in (*p.opts, *getattr(p, "secondary_opts", ())) if
                   opt.startswith("-")} for name, cmd in group.commands.items()}  # type: ignore[attr-defined]


def test_parser_joins_continuations_and_drops_comment_lines() -> None:
    instructions, comments = parse_dockerfile(
        "# top\nFROM a:1\nRUN echo 1 \\\n    # inside\n    && echo 2\nENV A=1 \\\n    B=\"x y\"\nENV C 3\n")
    assert [i.keyword for i in instructions] == ["FROM", "RUN", "ENV", "ENV"]
    assert instructions[1].args == "echo 1     && echo 2" and instructions[1].line == 3
    assert instructions[2].pairs() == {"A": "1", "B": "x y"} and instructions[3].pairs() == {"C": "3"}
    assert comments == ["top", "inside"]
    assert documented_commands(["docker run -v a:/b \\", "  img plan 4", "docker run x"], "docker run") == [
        ["docker", "run", "-v", "a:/b", "img", "plan", "4"], ["docker", "run", "x"]]


# ---------------------------------------------------------------- Dockerfile invariants


def test_base_is_a_pinned_pytorch_cuda_runtime_image(dockerfile) -> None:
    instructions, _ = dockerfile
    assert len(_all(instructions, "FROM")) == 1
    name, _, tag = _base_image(instructions).rpartition(":")
    assert name == "pytorch/pytorch", "use the official PyTorch image"
    assert tag and tag != "latest"
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)-cuda(\d+)\.(\d+)-cudnn\d+-runtime", tag)
    assert match, f"tag {tag!r} is not a full <torch>-cuda<x.y>-cudnn<n>-runtime tag"
    torch_floor = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    floor = tuple(int(x) for x in torch_floor.split(">=")[1].split("."))
    assert tuple(int(x) for x in match.groups()[:2]) >= floor, "the base image's torch must satisfy pyproject"


def test_entrypoint_is_autoseg_in_exec_form(dockerfile) -> None:
    instructions, _ = dockerfile
    (entrypoint,) = _all(instructions, "ENTRYPOINT")
    assert entrypoint.exec_form() == ["autoseg"]
    (cmd,) = _all(instructions, "CMD")
    assert cmd.exec_form() == ["--help"]


def test_data_paths_point_under_data(dockerfile) -> None:
    instructions, _ = dockerfile
    env: dict[str, str] = {}
    for instruction in _all(instructions, "ENV"):
        env.update(instruction.pairs())
    paths = [PurePosixPath(env[f"AUTOSEG_{kind}"]) for kind in ("RAW", "PREPROCESSED", "RESULTS")]
    assert all(p.is_relative_to("/data") and p != PurePosixPath("/data") for p in paths)
    assert len(set(paths)) == 3


def test_runs_as_a_created_non_root_user(dockerfile) -> None:
    instructions, _ = dockerfile
    entrypoint = _all(instructions, "ENTRYPOINT")[0]
    users = [i for i in _all(instructions, "USER") if i.line < entrypoint.line]
    assert users, "no USER before ENTRYPOINT: the container would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in {"root", "0"}
    created = [i for i in _all(instructions, "RUN") if i.line < users[-1].line
               and re.search(rf"\b(useradd|adduser)\b.*\b{re.escape(user)}\b", i.args)]
    assert created or user.isdigit(), f"user {user!r} is never created"


def test_no_secrets(dockerfile) -> None:
    instructions, _ = dockerfile
    for instruction in _all(instructions, "ENV") + _all(instructions, "ARG"):
        for name in instruction.pairs():
            assert not re.search(r"PASSWORD|PASSWD|TOKEN|SECRET|KEY|CREDENTIAL", name.upper()), name
    for instruction in _all(instructions, "ADD"):
        assert not re.search(r"\b(https?|ftp)://", instruction.args), "ADD of a remote file: COPY local files"
    text = DOCKERFILE.read_text(encoding="utf-8")
    for pattern in (r"://[^/\s:@]+:[^/\s@]+@", r"AKIA[0-9A-Z]{16}", r"-----BEGIN [A-Z ]*PRIVATE KEY",
                    r"\bgh[pousr]_[A-Za-z0-9]{30,}", r"(?i)(password|passwd|api_key)\s*[=:]"):
        assert not re.search(pattern, text), f"looks like a credential: {pattern}"


def test_pip_skips_its_cache_and_keeps_the_base_images_torch(dockerfile) -> None:
    instructions, _ = dockerfile
    runs = _all(instructions, "RUN")
    installs = [part for run in runs for part in run.args.split("&&") if "pip install" in part]
    assert installs
    for part in installs:
        assert "--no-cache-dir" in part, part
        constraint = re.search(r"(?:-c|--constraint)\s+(\S+)", part)
        assert constraint, f"pip install without the torch constraint: {part}"
        pinned = [run for run in runs if f"> {constraint.group(1)}" in run.args and "torch==" in run.args]
        assert pinned, f"{constraint.group(1)} is not written from the installed torch version"
    assert any("torch.version.cuda" in run.args for run in runs), "the CUDA torch is not checked after install"


def test_dependencies_are_installed_before_the_code_is_copied(dockerfile) -> None:
    instructions, _ = dockerfile
    copy_pyproject = next(i.line for i in _all(instructions, "COPY") if "pyproject.toml" in i.args)
    copy_code = next(i.line for i in _all(instructions, "COPY") if re.search(r"\bautoseg\b", i.args.split()[0]))
    first_install = next(i.line for i in _all(instructions, "RUN") if "pip install" in i.args)
    assert copy_pyproject < first_install < copy_code


@needs_bash
def test_the_requirement_list_snippet_reads_pyproject(dockerfile, tmp_path: Path) -> None:
    """Run the Dockerfile's own shell snippet that lists pyproject's dependencies."""
    instructions, _ = dockerfile
    snippet = next(part for run in _all(instructions, "RUN") for part in run.args.split("&&") if "tomllib" in part)
    command, _, target = snippet.rpartition(">")
    out = tmp_path / "requirements.txt"
    command = command.replace("python -c", f"{shlex.quote(sys.executable)} -c", 1)
    subprocess.run(["bash", "-c", f"{command} > {shlex.quote(str(out))}"], cwd=ROOT, check=True, timeout=60)
    assert target.strip() and out.read_text().split() == PYPROJECT["project"]["dependencies"]


def test_oci_labels_describe_the_image(dockerfile) -> None:
    instructions, _ = dockerfile
    labels: dict[str, str] = {}
    for instruction in _all(instructions, "LABEL"):
        labels.update(instruction.pairs())
    for key in ("title", "description", "version", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.version"] == PYPROJECT["project"]["version"]


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` (relative, with /) out of the build context: a pattern matches the
    path or one of its parents; a leading **/ matches at any depth; later !patterns re-include."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negated, pattern = pattern.startswith("!"), pattern.removeprefix("!")
        tails = candidates if not pattern.startswith("**/") else [
            "/".join(c.split("/")[k:]) for c in candidates for k in range(c.count("/") + 1)]
        if any(fnmatch(tail, pattern.removeprefix("**/")) for tail in tails):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_the_context_small_but_complete(dockerfile) -> None:
    path = ROOT / ".dockerignore"
    assert path.is_file()
    patterns = [line.strip() for line in path.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for left_out in (".git/config", ".venv/bin/python", "venv/bin/python", "autoseg/__pycache__/cli.pyc",
                     "autoseg.egg-info/PKG-INFO", "site/index.html", "autoseg_data/raw/x.nii.gz",
                     "tests/test_io.py", "benchmarks/bench_loader.py", "data/Dataset004/imagesTr/a.nii.gz"):
        assert _dockerignored(left_out, patterns), f".dockerignore does not leave out {left_out}"
    instructions, _ = dockerfile
    sources = [src for i in _all(instructions, "COPY") for src in i.args.split()[:-1] if not src.startswith("--")]
    assert sources
    for source in sources:
        files = [source] if (ROOT / source).is_file() else [
            p.relative_to(ROOT).as_posix() for p in (ROOT / source).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts]
        assert files, f"COPY {source}: nothing there"
        kept_out = [f for f in files if _dockerignored(f, patterns)]
        assert not kept_out, f".dockerignore leaves out files the image needs: {kept_out[:5]}"


def test_documented_docker_runs_use_gpus_shared_memory_and_the_callers_user(dockerfile) -> None:
    instructions, comments = dockerfile
    runs = documented_commands(comments, "docker run")
    assert runs, "the Dockerfile documents no `docker run`"
    assert any(c[:2] == ["docker", "build"] for c in documented_commands(comments, "docker build"))
    env: dict[str, str] = {}
    for instruction in _all(instructions, "ENV"):
        env.update(instruction.pairs())
    options = _cli_options()
    subcommands = set()
    for tokens in runs:
        text = " ".join(tokens)
        assert "--gpus" in tokens, text
        assert "--ipc=host" in tokens or "--shm-size" in tokens or any(t.startswith("--shm-size=") for t in tokens)
        assert tokens[tokens.index("--user") + 1] == "$(id -u):$(id -g)", text
        mounts = [tokens[i + 1].split(":")[1] for i, t in enumerate(tokens) if t == "-v"]
        assert any(PurePosixPath(env["AUTOSEG_RESULTS"]).is_relative_to(m) for m in mounts), text
        image = next(i for i, t in enumerate(tokens) if re.fullmatch(r"autoseg:[\w.-]+", t))
        rest = tokens[image + 1:]
        if "--entrypoint" in tokens[:image]:
            rest = rest[rest.index("-m") + 2:]
        subcommand, *args = rest
        assert subcommand in options, f"autoseg has no command {subcommand!r}"
        unknown = [a for a in args if a.startswith("-") and a not in options[subcommand]]
        assert not unknown, f"`autoseg {subcommand}` has no option {unknown}"
        subcommands.add(subcommand)
    assert {"plan", "preprocess", "train", "predict"} <= subcommands


def test_apptainer_recipe_matches_the_dockerfile(dockerfile) -> None:
    instructions, _ = dockerfile
    text = (SCRIPTS / "autoseg.def").read_text(encoding="utf-8")
    header = dict(re.findall(r"^(Bootstrap|From):\s*(\S+)", text, flags=re.M))
    assert header == {"Bootstrap": "docker", "From": _base_image(instructions)}
    env: dict[str, str] = {}
    for instruction in _all(instructions, "ENV"):
        env.update(instruction.pairs())
    exported = dict(re.findall(r"^\s*export (AUTOSEG_\w+)=(\S+)", text, flags=re.M))
    assert exported == {k: v for k, v in env.items() if k.startswith("AUTOSEG_")}
    assert re.search(r"%runscript\s+exec autoseg \"\$@\"", text)
    assert "--no-cache-dir" in text and "torch.version.cuda" in text
