"""`Arch`: one point of a search space as a frozen, hashable, JSON-able mapping."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any


class Arch(Mapping):
    """Immutable mapping from dimension name to its chosen value.

    Keeps the order of the space's dimensions so JSON output is stable and readable.
    """

    __slots__ = ("_items", "_hash")

    def __init__(self, values: Mapping[str, Any] | None = None, **kwargs: Any):
        merged = dict(values or {})
        merged.update(kwargs)
        self._items = tuple(merged.items())
        self._hash = hash(frozenset(self._items))

    def __getitem__(self, key: str) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Arch):
            return dict(self._items) == dict(other._items)
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Arch({self.to_json()})"

    def replace(self, **changes: Any) -> Arch:
        d = dict(self._items)
        d.update(changes)
        return Arch(d)

    def to_dict(self) -> dict[str, Any]:
        return dict(self._items)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Arch:
        return cls(json.loads(text))

    def __reduce__(self):
        return (Arch, (self.to_dict(),))
