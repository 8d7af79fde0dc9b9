"""mkdocs hook: the CLI reference page is generated from the typer app at build time, so it never drifts."""

from __future__ import annotations

from typing import Any

PAGE = "reference/cli.md"


def cli_reference_markdown() -> str:
    """Every command's usage, arguments and options, as typer documents them."""
    import typer
    from typer.cli import get_docs_for_click

    from autoseg.cli import app

    command = typer.main.get_command(app)
    text = get_docs_for_click(obj=command, ctx=typer.Context(command), name="autoseg", title="CLI reference")
    note = ("Generated from `autoseg --help` when this site is built. For a guided tour of the commands see "
            "[the command line](../cli.md).\n\n")
    first_break = text.index("\n") + 1
    return text[:first_break] + "\n" + note + text[first_break:].lstrip("\n")


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=cli_reference_markdown()))
    return files
