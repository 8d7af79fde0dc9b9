"""Dataclass <-> JSON round-trip and atomic file writes.

Contracts are frozen dataclasses holding tuples, nested dataclasses, dicts with string keys,
optionals and plain scalars. `to_jsonable` turns one into JSON-ready data; `from_jsonable`
rebuilds it from the type hints, so lists come back as tuples and nested objects as their class.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from autoseg.errors import AutosegError, FormatVersionError

T = TypeVar("T")


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, tuples, dicts and paths into JSON-compatible data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return obj.item()
    return obj


def from_jsonable(cls: Any, data: Any) -> Any:
    """Rebuild a value of type `cls` (a dataclass or a typing annotation) from JSON data."""
    origin = typing.get_origin(cls)
    args = typing.get_args(cls)
    if cls is Any or cls is None:
        return data
    if origin in (typing.Union, types.UnionType):
        return _from_union(args, data)
    if dataclasses.is_dataclass(cls):
        return _from_dataclass(cls, data)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_jsonable(args[0], v) for v in data)
        return tuple(from_jsonable(a, v) for a, v in zip(args, data, strict=True))
    if origin is dict:
        return {k: from_jsonable(args[1], v) for k, v in data.items()}
    if origin is list:
        return [from_jsonable(args[0], v) for v in data]
    if cls is float and isinstance(data, int):
        return float(data)
    if cls is Path:
        return Path(data)
    return data


def _from_union(args: tuple[Any, ...], data: Any) -> Any:
    if data is None and type(None) in args:
        return None
    candidates = [a for a in args if a is not type(None)]
    for candidate in candidates:
        if _matches(candidate, data):
            return from_jsonable(candidate, data)
    return from_jsonable(candidates[0], data)


def _matches(cls: Any, data: Any) -> bool:
    origin = typing.get_origin(cls) or cls
    if origin is tuple or origin is list:
        return isinstance(data, list)
    if origin is dict or dataclasses.is_dataclass(cls):
        return isinstance(data, dict)
    if cls is float:
        return isinstance(data, (int, float)) and not isinstance(data, bool)
    return isinstance(cls, type) and isinstance(data, cls)


def _from_dataclass(cls: Any, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name in data:
            kwargs[field.name] = from_jsonable(hints[field.name], data[field.name])
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise KeyError(field.name)
    return cls(**kwargs)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place.

    A crash midway leaves either the old file or none, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; plans and models are shared in a lab group
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write JSON (dataclasses converted) with stable indentation."""
    text = json.dumps(to_jsonable(data), indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: str | Path) -> Any:
    """Read JSON, turning a syntax error into a message that names the file and line."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AutosegError(
            f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})",
            path=path,
            hint="fix the syntax, e.g. with `python -m json.tool FILE`",
        ) from err


def save_contract(path: str | Path, obj: Any) -> None:
    """Write a contract dataclass (which has a `format` field) as JSON, atomically."""
    write_json(path, obj)


def load_contract(path: str | Path, cls: type[T], *, rerun: str) -> T:
    """Load a contract written by `save_contract`, checking its format version.

    `rerun` names the command that recreates the file; it goes into the error's hint.
    """
    data = read_json(path)
    expected = next(f.default for f in dataclasses.fields(cls) if f.name == "format")  # type: ignore[arg-type]
    found = data.get("format") if isinstance(data, dict) else None
    if found is None and isinstance(data, dict) and "original_median_spacing_after_transp" in data:
        raise FormatVersionError(f"this looks like an nnU-Net file, not an autoseg {cls.__name__} file", path=path,
                                 hint="for an nnU-Net model folder, run `autoseg import-nnunet FOLDER` (or predict -m "
                                      "FOLDER); to train, plan with autoseg. See docs/migrating.md")
    if found != expected:
        raise FormatVersionError(
            f"{cls.__name__} file has format {found!r}, this autoseg reads format {expected}",
            path=path,
            hint=f"recreate it with `{rerun}`",
        )
    try:
        return from_jsonable(cls, data)  # type: ignore[no-any-return]
    except (KeyError, TypeError, ValueError) as err:
        raise FormatVersionError(
            f"{cls.__name__} file is incomplete or damaged ({err!r})",
            path=path,
            hint=f"recreate it with `{rerun}`",
        ) from err
