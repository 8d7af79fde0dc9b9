"""House rules that code review would otherwise have to catch (see ../shared/DESIGN.md)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autoseg"
MAX_LINES = 450

#: Layer of each top-level module or package; a module may import its own layer or lower ones.
LAYERS = {
    "__init__": 0, "errors": 0, "log": 0, "serialization": 0, "paths": 0, "registry": 0,
    "runtime": 0, "io": 0,
    "dataset": 1, "fingerprint": 2, "model": 3, "planning": 4, "preprocessing": 5,
    "model_folder": 6, "training": 7, "inference": 7, "evaluation": 8, "sharing": 8, "api": 9, "api_evaluation": 9,
    "cli_tables": 10, "cli": 10, "cli_inference": 10, "cli_sharing": 10, "__main__": 11,
}
#: Pairs that must never import each other even though their layers would allow it.
FORBIDDEN = {("training", "inference"), ("inference", "training")}
#: Packages that stay free of pipeline imports (only leaves), so anything can use them.
LEAF_ONLY = {"model"}
LEAVES = {name for name, layer in LAYERS.items() if layer == 0}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _top(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_tops(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name.split(".")[1] for name in names if name.startswith("autoseg.")}


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path: Path) -> None:
    own = _top(path)
    assert own in LAYERS, f"new top-level module {own!r}: add it to LAYERS in this test"
    for target in _imported_tops(path) - {own}:
        assert target in LAYERS, f"{path}: imports unknown module autoseg.{target}"
        assert LAYERS[target] <= LAYERS[own], f"{path}: {own} (layer {LAYERS[own]}) imports {target}"
        assert (own, target) not in FORBIDDEN, f"{path}: {own} must not import {target}"
        if own in LEAF_ONLY:
            assert target in LEAVES, f"{path}: {own} may import only leaf modules, not {target}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_stay_small(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path} has {lines} lines; split it (budget {MAX_LINES})"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_runtime_touches_devices(path: Path) -> None:
    if _top(path) == "runtime":
        return
    text = path.read_text(encoding="utf-8")
    for pattern in (r"torch\.distributed", r"torch\.cuda\.set_device", r"GradScaler"):
        assert not re.search(pattern, text), f"{path} uses {pattern}: go through autoseg.runtime"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_code_does_not_print(path: Path) -> None:
    if _top(path) in {"cli", "cli_tables", "cli_inference", "__main__"}:
        return
    tree = ast.parse(path.read_text(encoding="utf-8"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
    assert not calls, f"{path} calls print(): log through autoseg.log instead"


def test_importing_autoseg_and_its_cli_does_not_import_torch() -> None:
    code = (
        "import sys, autoseg, autoseg.api, autoseg.cli, autoseg.planning, autoseg.fingerprint;"
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"importing autoseg loaded torch or failed: {result.stderr[-500:]}"
