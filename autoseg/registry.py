"""Named registries (normalisation schemes, architectures, ...) with "did you mean" lookups.

Plans and model folders store registry keys, never Python class names, so any stored
artefact can be rebuilt without custom code.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from autoseg.errors import SettingsError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from lower-case keys to objects, filled with the `register` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        key = name.lower()

        def add(item: T) -> T:
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[key] = item
            return item

        return add

    def remove(self, name: str) -> None:
        """Forget `name` (for tests that register a temporary item); unknown names are ignored."""
        self._items.pop(name.lower(), None)

    def get(self, name: str) -> T:
        key = name.lower()
        if key in self._items:
            return self._items[key]
        close = difflib.get_close_matches(key, self._items, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise SettingsError(
            f"unknown {self.kind} {name!r}",
            hint=f"{hint}known: {', '.join(sorted(self._items))}",
        )

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
