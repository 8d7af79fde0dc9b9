"""Split a folder's cases over N independent processes (`--part I/N`): SLURM arrays, several jobs per machine.

Part I of N takes every N-th case of the sorted case list, starting at the I-th (1-based), so the parts
are disjoint, together cover every case exactly once, and stay balanced when case sizes drift along the
list. The split depends only on the case ids, so every task of an array (and any rerun) computes the
same one without talking to the others.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from autoseg.errors import SettingsError

T = TypeVar("T")
PART_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Part:
    """Part `index` (1 to `count`) of `count`."""

    index: int = 1
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 1 <= self.index <= self.count:
            raise SettingsError(f"part {self.index}/{self.count} does not exist: parts are numbered 1 to N",
                                hint="give --part I/N with 1 <= I <= N, e.g. --part 1/4 ... --part 4/4 (in a SLURM "
                                     "array: $((SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN + 1))/"
                                     "$SLURM_ARRAY_TASK_COUNT)")

    @classmethod
    def parse(cls, text: str | None) -> Part:
        """'2/4' -> Part(2, 4); None or '' -> the whole (1/1)."""
        if not text:
            return cls()
        match = PART_PATTERN.match(text)
        if match is None:
            raise SettingsError(f"--part {text!r} is not I/N", hint="write the part as I/N, e.g. --part 2/4")
        return cls(int(match[1]), int(match[2]))

    @property
    def whole(self) -> bool:
        return self.count == 1

    def select(self, items: Sequence[T]) -> list[T]:
        """This part's share of `items` (already in their canonical, sorted order)."""
        return list(items[self.index - 1::self.count])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


#: The whole job (no --part): every case.
WHOLE = Part()
