"""One lazy registry per kind of component: defences, attacks, metrics, datasets.

Names are known without importing any component module, so ``harness list``, ``--help`` and a
mistyped name answer without loading torch:

* built-in components register with a decorator in their own module::

      @DEFENCES.register("repnoise")
      class RepNoise(Defence): ...

  The registry finds these decorators by reading the source of the built-in packages
  (``ast``, no import) and imports a module only when one of its components is asked for by
  name. A built-in must therefore register with the decorator, on the class statement.
* third-party packages add components through Python entry points in the groups
  ``harness.defences``, ``harness.attacks``, ``harness.metrics`` and ``harness.lib.datasets``;
  each entry point names the component and points at its class, e.g. in the other package's
  ``pyproject.toml``::

      [project.entry-points."harness.defences"]
      my_defence = "my_pkg.defence:MyDefence"

  An entry point's name is known from the installed metadata; its module is imported when the
  component is asked for (or by ``harness list``, which checks every plug-in). A plug-in whose
  module fails to import, or whose name clashes with a built-in (or with another plug-in), is
  skipped: a WARNING names its distribution, and ``harness list`` shows it. It never replaces a
  built-in and never breaks the listing of the others.

Unknown names fail with the list of known names and a "did you mean" suggestion.
"""

from __future__ import annotations

import ast
import importlib
import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

from harness.api.errors import ConfigError, UnknownComponentError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """Where a registered name comes from, known before its module is imported."""

    name: str
    target: str  # "module:Class"
    origin: str  # "built-in", or the distribution that declares the entry point
    description: str = ""  # first docstring line, read from the source for built-ins

    @property
    def module(self) -> str:
        return self.target.split(":", 1)[0]


@dataclass(frozen=True)
class PluginProblem:
    """A plug-in that was skipped, and why."""

    kind: str
    name: str
    target: str
    distribution: str
    reason: str

    def __str__(self) -> str:
        return (f"{self.kind} {self.name!r} from distribution {self.distribution!r} ({self.target}) skipped: "
                f"{self.reason}")


class PluginError(ConfigError):
    """A plug-in component was asked for by name but cannot be used."""


def _first_line(doc: Optional[str]) -> str:
    doc = (doc or "").strip()
    return doc.splitlines()[0] if doc else ""


# the built-in packages ship in the same distribution as ``harness``: defences/, attacks/, metrics/
# are its siblings, harness/lib/datasets/ is inside it
_ROOT = Path(__file__).resolve().parent.parent.parent


def _package_dir(package: str) -> Optional[Path]:
    folder = _ROOT.joinpath(*package.split("."))
    return folder if (folder / "__init__.py").is_file() else None


def scan_registrations(package: str, variable: str) -> dict[str, Entry]:
    """``name -> Entry`` for every ``@<variable>.register("name")`` class decorator in the modules
    of ``package`` (one level, read with ``ast``; nothing is imported)."""
    folder = _package_dir(package)
    out: dict[str, Entry] = {}
    if folder is None:
        return out
    for path in sorted(folder.glob("*.py")):
        module = package if path.stem == "__init__" else f"{package}.{path.stem}"
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue  # importing it will report the real error
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            for deco in node.decorator_list:
                if (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)
                        and deco.func.attr == "register" and isinstance(deco.func.value, ast.Name)
                        and deco.func.value.id == variable and len(deco.args) == 1
                        and isinstance(deco.args[0], ast.Constant) and isinstance(deco.args[0].value, str)):
                    name = deco.args[0].value
                    out[name] = Entry(name, f"{module}:{node.name}", "built-in", _first_line(ast.get_docstring(node)))
    return out


class Registry(Generic[T]):
    """Name -> component map for one kind of component, filled lazily (see the module docstring)."""

    def __init__(self, kind: str, group: str, packages: tuple[str, ...] = (), variable: str = ""):
        self.kind = kind
        self.group = group
        self.packages = packages
        self.variable = variable
        self._items: dict[str, T] = {}  # loaded components (and ones added at run time)
        self._builtins: Optional[dict[str, Entry]] = None
        self._plugins: Optional[dict[str, tuple[Entry, Any]]] = None  # name -> (entry, EntryPoint)
        self._problems: dict[str, PluginProblem] = {}

    # ---- registration -------------------------------------------------------------------------
    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        existing = self._items.get(name)
        if existing is not None and existing is not obj:
            raise ValueError(f"{self.kind} {name!r} is registered twice ({existing!r} and {obj!r})")
        builtin = self.builtins().get(name)
        if builtin is not None and existing is None and _target(obj) != builtin.target:
            raise ValueError(f"{self.kind} {name!r} is a built-in ({builtin.target}); {_target(obj)} cannot "
                             "register the same name")
        self._items[name] = obj
        try:
            setattr(obj, "registry_name", name)
        except (AttributeError, TypeError):
            pass

    # ---- what is known without importing ------------------------------------------------------
    def builtins(self) -> dict[str, Entry]:
        if self._builtins is None:
            found: dict[str, Entry] = {}
            for package in self.packages:
                found.update(scan_registrations(package, self.variable))
            self._builtins = found
        return self._builtins

    def plugins(self) -> dict[str, tuple[Entry, Any]]:
        """Usable entry points by name (metadata only). Clashes are recorded as problems."""
        if self._plugins is None:
            by_name: dict[str, list[tuple[Entry, Any]]] = {}
            for ep in metadata.entry_points(group=self.group):
                dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
                by_name.setdefault(ep.name, []).append((Entry(ep.name, ep.value, dist), ep))
            plugins: dict[str, tuple[Entry, Any]] = {}
            builtins = self.builtins()
            for name, found in sorted(by_name.items()):
                if name in builtins:
                    for entry, _ in found:
                        self._problem(entry, f"the name clashes with the built-in {builtins[name].target}")
                elif len({e.target for e, _ in found}) > 1:
                    others = ", ".join(sorted(f"{e.origin} ({e.target})" for e, _ in found))
                    for entry, _ in found:
                        self._problem(entry, f"several plug-ins declare this name: {others}")
                else:
                    plugins[name] = found[0]
            self._plugins = plugins
        return self._plugins

    def _problem(self, entry: Entry, reason: str) -> None:
        key = f"{entry.name}|{entry.origin}|{entry.target}"
        if key not in self._problems:
            problem = PluginProblem(self.kind, entry.name, entry.target, entry.origin, reason)
            self._problems[key] = problem
            log.warning("plug-in %s", problem)

    def problems(self) -> list[PluginProblem]:
        """Plug-ins skipped so far (clashes are known from metadata; import failures once tried)."""
        self.plugins()
        return list(self._problems.values())

    def names(self) -> list[str]:
        """Every usable name; imports nothing (a broken plug-in shows up once it is loaded)."""
        broken = {p.name for p in self._problems.values() if p.name not in self.builtins()}
        names = set(self.builtins()) | (set(self.plugins()) - broken) | set(self._items)
        return sorted(names)

    def entry(self, name: str) -> Optional[Entry]:
        if name in self.builtins():
            return self.builtins()[name]
        found = self.plugins().get(name)
        return found[0] if found else None

    def __contains__(self, name: str) -> bool:
        return name in self._items or name in self.builtins() or name in self.plugins()

    def check(self, name: str) -> None:
        """Raise ``UnknownComponentError`` unless ``name`` is known (imports nothing)."""
        if name not in self:
            raise UnknownComponentError(self.kind, name, self.names())

    # ---- loading --------------------------------------------------------------------------------
    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        builtin = self.builtins().get(name)
        if builtin is not None:
            importlib.import_module(builtin.module)  # the decorator registers it
            if name not in self._items:
                raise RuntimeError(f"built-in {self.kind} {name!r}: importing {builtin.module} did not register it")
            return self._items[name]
        plugin = self.plugins().get(name)
        if plugin is not None:
            obj = self._load_plugin(*plugin)
            if obj is not None:
                return obj
            problem = next(p for p in self._problems.values() if p.name == name)
            raise PluginError(f"{self.kind} {name!r} cannot be used: {problem}")
        raise UnknownComponentError(self.kind, name, self.names())

    def _load_plugin(self, entry: Entry, ep: Any) -> Optional[T]:
        if any(p.name == entry.name and p.target == entry.target for p in self._problems.values()):
            return None
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not hide the others
            self._problem(entry, f"import failed: {type(exc).__name__}: {exc}")
            return None
        if entry.name in self._items and self._items[entry.name] is not obj:
            self._problem(entry, f"the name is already taken by {_target(self._items[entry.name])}")
            return None
        self.add(entry.name, obj)
        return obj

    def load_all(self) -> None:
        """Import every built-in and plug-in of this kind (plug-ins that fail are skipped)."""
        for name in self.builtins():
            self.get(name)
        for entry, ep in self.plugins().values():
            self._load_plugin(entry, ep)

    def items(self) -> Iterator[tuple[str, T]]:
        """``(name, class)`` of every usable component, importing all of them."""
        self.load_all()
        for name in sorted(self._items):
            yield name, self._items[name]

    def catalog(self) -> list[tuple[str, str, str]]:
        """``(name, description, origin)`` for ``harness list``: built-ins from their source (not
        imported), plug-ins imported (to check them), components added at run time."""
        rows = {name: (name, e.description, e.origin) for name, e in self.builtins().items()}
        for entry, ep in self.plugins().values():
            obj = self._load_plugin(entry, ep)
            if obj is not None:
                rows[entry.name] = (entry.name, describe(obj), entry.origin)
        for name, obj in self._items.items():
            rows.setdefault(name, (name, describe(obj), getattr(obj, "__module__", "")))
        return [rows[n] for n in sorted(rows)]


def _target(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"


def describe(obj: Any) -> str:
    """First line of a component's docstring."""
    return _first_line(getattr(obj, "__doc__", None))


def load_builtins() -> None:
    """Import every built-in component module (the test suite and the layering test use it)."""
    for registry in REGISTRIES.values():
        for name in registry.builtins():
            registry.get(name)


DEFENCES: Registry = Registry("defence", "harness.defences", ("defences",), "DEFENCES")
ATTACKS: Registry = Registry("attack", "harness.attacks", ("attacks",), "ATTACKS")
METRICS: Registry = Registry("metric", "harness.metrics", ("metrics",), "METRICS")
DATASETS: Registry = Registry("dataset", "harness.lib.datasets", ("harness.lib.datasets",), "DATASETS")
REGISTRIES = {"defences": DEFENCES, "attacks": ATTACKS, "metrics": METRICS, "datasets": DATASETS}
