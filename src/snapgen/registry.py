"""Registry: every name -> class/factory map in snapgen (models, tasks, samplers, ...) is one of these.

A registry is a dict with a decorator to fill it, a lookup whose error lists the known names, and
``names()`` for CLI choices (as DiT's ``DiT_models`` dict gives ``--model`` its choices)::

    MODELS = Registry("model family")

    @MODELS.register("three_stage_dit")
    class ThreeStageDiT(nn.Module): ...

    MODELS.get("three_stage_dit")      # the class
    MODELS.get("unet")                 # KeyError: unknown model family 'unet'; known: three_stage_dit, ...

Entries register when their module is imported; a registry that needs all of them imports the modules
(``snapgen.models`` imports every model file, ``snapgen.tasks`` every task file).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "UnknownName"]

T = TypeVar("T")


class UnknownName(KeyError, ValueError):
    """A name no entry is registered under. A ``KeyError`` for lookups and a ``ValueError`` for the CLI's
    one-line error policy; its message is printed without ``KeyError``'s quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Name -> entry. ``what`` names the kind in error messages ("model family", "task", "sampler")."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, entry: T | None = None, **meta) -> Callable[[T], T] | T:
        """``@reg.register("name")`` as a decorator, or ``reg.register("name", entry)``. ``meta`` is kept
        beside the entry (``reg.meta(name)``). Registering a name twice with another entry is an error."""

        def add(obj: T) -> T:
            old = self._entries.get(name)
            if old is not None and old is not obj and getattr(old, "__qualname__", None) != getattr(
                    obj, "__qualname__", object()):
                raise ValueError(f"{self.what} {name!r} is already registered to {old!r}")
            self._entries[name] = obj
            self._meta[name] = dict(meta)
            return obj

        return add if entry is None else add(entry)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownName(f"unknown {self.what} {name!r}; known: {', '.join(self.names()) or '(none)'}") from None

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self.names())})"
