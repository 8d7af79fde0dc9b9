"""The documentation site: every nav page exists, and the generated CLI reference covers every command."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import typer

from autoseg.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _hook():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "mkdocs_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_nav_page_exists_and_every_doc_is_in_the_nav() -> None:
    text = (ROOT / "mkdocs.yml").read_text()
    pages = re.findall(r"^\s+- [^:]+: (\S+\.md)$", text, flags=re.M)
    hook = _hook()
    assert hook.PAGE in pages and len(pages) >= 12
    missing = [page for page in pages if page != hook.PAGE and not (ROOT / "docs" / page).is_file()]
    assert missing == []
    on_disk = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk - set(pages) == set(), "add new pages to the nav in mkdocs.yml"


def test_generated_cli_reference_documents_every_command_and_option() -> None:
    markdown = _hook().cli_reference_markdown()
    group = typer.main.get_command(app)
    assert len(group.commands) >= 14
    for name, command in group.commands.items():
        assert f"## `autoseg {name}`" in markdown, name
        for parameter in command.params:
            for flag in getattr(parameter, "opts", []):
                if flag.startswith("--"):
                    assert flag in markdown, (name, flag)
    assert "[the command line](../cli.md)" in markdown
