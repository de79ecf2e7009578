"""One registry shape for everything chosen by name: merge methods, importance estimators, reference resolvers.

A :class:`Registry` maps names to objects. Built-in entries are declared where the registry is created, as
``"package.module:attribute"`` strings, and imported on first use. So:

- the module that owns a registry imports none of its entries (no import cycle between a registry and the modules
  that fill it, and ``mergeflow methods`` does not import torch-heavy estimator code just to list names), and
- the one place that lists the built-ins is the ``builtins`` mapping given to the registry's constructor.

Registering, from the module that defines the object (either form returns the object)::

    METHODS.register("ties", TIES)                 # a plain call, aliases=(...) for extra names

    @RESOLVERS.register("zoo")                     # a decorator
    def resolve_zoo(reference: str) -> Path: ...

A module listed as a lazy entry may register its objects when imported (then the import fills the entry) or just
define the attribute the entry names; either works. A name is registered once: a second, different object under the
same name is an error (tests swap entries with ``monkeypatch.setitem(REGISTRY, name, obj)``, which sets and restores
an entry explicitly).

The shape follows lm-eval's ``api/registry.py`` (decorator registration, lazy ``module:attr`` entries) and
mergekit's method registry (a method is one module plus one line in the list of built-ins).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")


def import_entry(spec: str) -> Any:
    """The object a ``"package.module:attribute"`` string names (``"package.module"`` alone: the module)."""
    module_name, _, attribute = spec.partition(":")
    module = importlib.import_module(module_name)
    if not attribute:
        return module
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ImportError(f"{module_name} has no attribute {attribute!r} (registry entry {spec!r})") from None


class Registry(MutableMapping[str, T], Generic[T]):
    """Names to objects of one kind, with lazy built-in entries.

    ``kind`` names the objects in messages ("merge method", "estimator"); ``unknown(name, known_names)`` builds the
    exception :meth:`lookup` raises for a name that is not registered (default: a ``KeyError``).
    """

    def __init__(self, kind: str, builtins: Mapping[str, str] | None = None, *,
                 unknown: Callable[[str, list[str]], Exception] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = dict(builtins or {})  # str: a lazy "module:attr" not imported yet
        self._lazy = set(self._entries)
        self._unknown = unknown

    # -- registration

    @overload
    def register(self, name: str, obj: None = None, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T, *, aliases: tuple[str, ...] = ()) -> T: ...

    def register(self, name: str, obj: T | None = None, *, aliases: tuple[str, ...] = ()) -> T | Callable[[T], T]:
        """Register ``obj`` under ``name`` (and ``aliases``); without ``obj``, a decorator that does so."""
        if obj is None:
            def decorate(target: T) -> T:
                return self.register(name, target, aliases=aliases)
            return decorate
        for key in (name, *aliases):
            current = self._entries.get(key)
            if key in self._entries and key not in self._lazy and current is not obj:
                raise ValueError(f"{self.kind} {key!r} registered twice")
            self._entries[key] = obj
            self._lazy.discard(key)
        return obj

    # -- lookup

    def lookup(self, name: str) -> T:
        """The object registered as ``name``, importing its module if it is a lazy entry; an unknown name raises
        the registry's ``unknown`` error, which lists the known names."""
        try:
            return self[name]
        except KeyError:
            known = sorted(self._entries)
            if self._unknown is not None:
                raise self._unknown(name, known) from None
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(known)}") from None

    def __getitem__(self, name: str) -> T:
        entry = self._entries[name]
        if name not in self._lazy:
            return entry  # type: ignore[return-value]
        target = import_entry(entry)  # type: ignore[arg-type]
        if name in self._lazy:  # importing did not register it: the attribute is the object
            self._entries[name] = target
            self._lazy.discard(name)
        return self._entries[name]  # type: ignore[return-value]

    def __setitem__(self, name: str, obj: T) -> None:
        """Set ``name`` to ``obj``, replacing any entry (tests swap entries this way); use :meth:`register` to add."""
        self._entries[name] = obj
        self._lazy.discard(name)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]
        self._lazy.discard(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries  # without importing anything

    def unique(self) -> list[T]:
        """Every registered object once (aliases folded), in the order of their first name; imports lazy entries."""
        seen: dict[int, T] = {}
        for name in self:
            obj = self[name]
            seen.setdefault(id(obj), obj)
        return list(seen.values())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries, {len(self._lazy)} not imported yet)"
