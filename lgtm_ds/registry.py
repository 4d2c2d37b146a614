"""Name -> class registries for the two things that vary between experiments: the distillation
method (``lgtm_ds.methods``) and the task type (``lgtm_ds.tasks``).

The trainer, the launch scripts and the config ask a registry; none of them branches on a name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """``@registry.register`` on a class with a ``name`` attribute; ``registry.get(name)``."""

    def __init__(self, kind: str, key: str):
        self.kind = kind  # "method", "task type": used in error messages
        self.key = key  # the config key that names an entry, e.g. "method.name"
        self._entries: dict[str, type[T]] = {}
        self._listeners: list[Callable[[], None]] = []

    def register(self, cls: type[T]) -> type[T]:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"a registered {self.kind} needs a non-empty class attribute 'name'")
        if name in self._entries and self._entries[name] is not cls:
            raise TypeError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = cls
        self._changed()
        return cls

    def unregister(self, name: str) -> None:
        """Remove the entry ``name`` (tests that register a class of their own clean up)."""
        if name not in self._entries:
            raise KeyError(f"no {self.kind} {name!r} is registered")
        del self._entries[name]
        self._changed()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every registration and removal (what is built from the
        entries, e.g. the config's ``method`` section, rebuilds itself)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def get(self, name: str) -> type[T]:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(self.unknown(name)) from None

    def unknown(self, name: object) -> str:
        msg = f"{self.key} must be one of {{{', '.join(self.names())}}}, got {name!r}"
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        return msg + (f"; did you mean {close[0]!r}?" if close else "")

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> list[tuple[str, type[T]]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries
