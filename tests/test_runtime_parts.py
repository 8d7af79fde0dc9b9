"""--part I/N: a deterministic split of a folder's cases over N processes, each case exactly once."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoseg.errors import SettingsError
from autoseg.runtime.parts import Part


@given(st.lists(st.text(min_size=1, max_size=8), unique=True, max_size=60), st.integers(1, 12))
def test_the_parts_cover_every_case_exactly_once(cases: list[str], count: int) -> None:
    ordered = sorted(cases)
    shares = [Part(index, count).select(ordered) for index in range(1, count + 1)]
    assert sorted(case for share in shares for case in share) == ordered
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1  # balanced
    assert shares == [Part.parse(f"{index}/{count}").select(ordered) for index in range(1, count + 1)]


def test_parse_accepts_i_of_n_and_refuses_the_rest() -> None:
    assert Part.parse("2/4") == Part(2, 4) and Part.parse(" 3 / 3 ") == Part(3, 3)
    assert Part.parse(None).whole and Part.parse("").whole and Part.parse("1/1").whole
    assert str(Part(2, 4)) == "2/4" and not Part(2, 4).whole
    for text, message in (("0/4", "numbered 1 to N"), ("5/4", "numbered 1 to N"), ("1/0", "numbered 1 to N"),
                          ("2", "is not I/N"), ("a/b", "is not I/N"), ("-1/4", "is not I/N")):
        with pytest.raises(SettingsError, match=message):
            Part.parse(text)
