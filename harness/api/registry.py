"""One small generic registry for defences, attacks, metrics and datasets.

Built-in components register with a decorator::

    @DEFENCES.register("repnoise")
    class RepNoise(Defence): ...

Third-party packages add components without touching this repository through Python entry
points in the groups ``harness.defences``, ``harness.attacks``, ``harness.metrics`` and
``harness.lib.datasets``; each entry point names the component and points at its class, e.g. in the
other package's ``pyproject.toml``::

    [project.entry-points."harness.defences"]
    my_defence = "my_pkg.defence:MyDefence"

Unknown names fail with the list of known names and a "did you mean" suggestion.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from importlib import metadata
from typing import Any, Callable, Generic, Iterator, TypeVar

from harness.api.errors import UnknownComponentError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Modules that hold the built-in components; imported once, on first lookup.
BUILTIN_MODULES = ("defences", "attacks", "metrics", "harness.lib.datasets")


class Registry(Generic[T]):
    """Name -> component map for one kind of component."""

    def __init__(self, kind: str, group: str):
        self.kind = kind
        self.group = group
        self._items: dict[str, T] = {}
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        existing = self._items.get(name)
        if existing is not None and existing is not obj:
            raise ValueError(f"{self.kind} {name!r} is registered twice ({existing!r} and {obj!r})")
        self._items[name] = obj
        try:
            setattr(obj, "registry_name", name)
        except (AttributeError, TypeError):
            pass

    def _load(self) -> None:
        load_builtins()
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.group):
            if ep.name in self._items:
                continue
            try:
                self.add(ep.name, ep.load())
            except Exception as exc:  # a broken plug-in must not hide the others
                log.warning("could not load %s %r from entry point %s: %s", self.kind, ep.name, ep.value, exc)

    def get(self, name: str) -> T:
        self._load()
        if name in self._items:
            return self._items[name]
        raise UnknownComponentError(self.kind, name, sorted(self._items))

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        for name in sorted(self._items):
            yield name, self._items[name]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items


def suggest(name: str, known: list[str]) -> list[str]:
    return difflib.get_close_matches(name, known, n=3, cutoff=0.5)


def describe(obj: Any) -> str:
    """First line of a component's docstring."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


_builtins_loaded = False


def load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


DEFENCES: Registry = Registry("defence", "harness.defences")
ATTACKS: Registry = Registry("attack", "harness.attacks")
METRICS: Registry = Registry("metric", "harness.metrics")
DATASETS: Registry = Registry("dataset", "harness.lib.datasets")
REGISTRIES = {"defences": DEFENCES, "attacks": ATTACKS, "metrics": METRICS, "datasets": DATASETS}
