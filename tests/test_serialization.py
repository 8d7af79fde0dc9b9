"""JSON round-trips of contracts, format checks and atomic writes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoseg.errors import AutosegError, FormatVersionError
from autoseg.serialization import (
    atomic_write,
    from_jsonable,
    load_contract,
    read_json,
    save_contract,
    to_jsonable,
)


@dataclass(frozen=True)
class Inner:
    values: tuple[int, ...]
    label: str | None = None


@dataclass(frozen=True)
class Outer:
    name: str
    spacing: tuple[float, ...]
    inner: tuple[Inner, ...]
    by_name: dict[str, Inner]
    nested: tuple[tuple[int, ...], ...]
    optional: float | None = None
    format: int = 3


outers = st.builds(
    Outer,
    name=st.text(max_size=8),
    spacing=st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=3).map(tuple),
    inner=st.lists(st.builds(Inner, values=st.lists(st.integers(), max_size=3).map(tuple),
                             label=st.none() | st.text(max_size=4)), max_size=3).map(tuple),
    by_name=st.dictionaries(st.text(max_size=4), st.builds(Inner, values=st.just((1, 2)))),
    nested=st.lists(st.lists(st.integers(), max_size=3).map(tuple), max_size=3).map(tuple),
    optional=st.none() | st.floats(allow_nan=False, allow_infinity=False),
)


@given(outers)
def test_round_trip_restores_equal_object(obj: Outer) -> None:
    text = json.dumps(to_jsonable(obj))
    assert from_jsonable(Outer, json.loads(text)) == obj


def test_integers_come_back_as_floats_where_annotated() -> None:
    restored = from_jsonable(Outer, {"name": "a", "spacing": [1, 2], "inner": [], "by_name": {},
                                     "nested": [], "optional": 3})
    assert restored.spacing == (1.0, 2.0) and isinstance(restored.spacing[0], float)
    assert isinstance(restored.optional, float)


def test_load_contract_rejects_other_format(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    save_contract(path, Outer("a", (1.0,), (), {}, ()))
    data = json.loads(path.read_text())
    data["format"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(FormatVersionError) as err:
        load_contract(path, Outer, rerun="autoseg plan 4")
    assert "autoseg plan 4" in err.value.hint and "format 2" in err.value.message


def test_load_contract_reports_missing_fields(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"format": 3, "name": "x"}))
    with pytest.raises(FormatVersionError, match="incomplete"):
        load_contract(path, Outer, rerun="redo")


def test_read_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n "a": 1,\n}')
    with pytest.raises(AutosegError) as err:
        read_json(path)
    assert err.value.path == str(path) and "line 3" in err.value.message


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old")

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(path, failing)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_writes_follow_the_umask_like_any_new_file(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        atomic_write(tmp_path / "plans.json", lambda tmp: tmp.write_text("{}"))
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    mode = (tmp_path / "plans.json").stat().st_mode & 0o777
    assert mode == 0o640 == (tmp_path / "plain.txt").stat().st_mode & 0o777  # group may read, not only the owner


def test_an_nnunet_plans_file_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "plans.json"
    path.write_text(json.dumps({"dataset_name": "Dataset004_Hippocampus", "plans_name": "nnUNetPlans",
                                "original_median_spacing_after_transp": [1, 1, 1], "configurations": {}}))
    with pytest.raises(FormatVersionError, match="nnU-Net file") as err:
        load_contract(path, Outer, rerun="autoseg plan")
    assert "migrating" in err.value.hint
