"""The one way raynas names pluggable implementations: supernet families, training strategies, search
algorithms.

A registry maps a name (what a config or a flag says) to an implementation. Built-ins are declared as
`"module"` or `"module:attribute"` strings and imported on first use, so listing the names (for choices
and error messages) imports nothing heavy. Plug-ins (strategies from `--plugin` modules or entry points)
are added as objects with `add`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from raynas.errors import ConfigError, UserError


class Registry:
    def __init__(self, field: str, builtins: Mapping[str, str], error: type[UserError] = ConfigError):
        self.field = field  # the config field that names an entry, for error messages
        self.error = error
        self._declared = dict(builtins)
        self._loaded: dict[str, Any] = {}

    def names(self) -> list[str]:
        return sorted({*self._declared, *self._loaded})

    def add(self, name: str, obj: Any) -> None:
        """Register `obj` under `name`; a name already used by another object is refused (the same class
        imported again, e.g. by a worker or under another module name, is the same object)."""
        existing = self._loaded.get(name)
        if existing is not None:
            taken = existing.__qualname__ != obj.__qualname__
        else:
            taken = name in self._declared and self._declared[name] != f"{obj.__module__}:{obj.__qualname__}"
        if taken:
            raise TypeError(f"{self.field} '{name}' is taken by {existing or self._declared[name]}")
        self._loaded[name] = obj

    def find(self, name: str) -> Any | None:
        """The entry called `name`, imported if declared; None when there is none."""
        if name not in self._loaded:
            target = self._declared.get(name)
            if target is None:
                return None
            module, _, attribute = target.partition(":")
            obj = importlib.import_module(module)
            self._loaded[name] = getattr(obj, attribute) if attribute else obj
        return self._loaded[name]

    def get(self, name: Any) -> Any:
        """The entry called `name`, or the one-line error naming the field and the allowed names."""
        found = self.find(name) if isinstance(name, str) else None
        if found is None:
            raise self.error(f"{self.field}: unknown '{name}'; allowed: {self.names()}")
        return found

    def copy(self) -> Registry:
        out = Registry(self.field, self._declared, self.error)
        out._loaded = dict(self._loaded)
        return out


__all__ = ["Registry"]
