"""The package's layering, read from the import statements of every module (``ast``, nothing is
imported):

    api  <  lib  <  {pipeline, defences, attacks, metrics}  <  {sweep, leaderboards}  <  cli

* no module imports a module of a higher layer, nor a module of another package of its own layer
  (the pipeline finds defences through the registry, never by importing them), except the one
  direction ``SAME_LAYER_ALLOWED`` names with its reason (sweep -> leaderboards);
* no import cycles between modules (module-level and function-level imports both count);
* a project module is imported inside a function only where ``FUNCTION_LEVEL_ALLOWED`` says why
  (the CLI's fast path, which must not import torch for ``harness list`` / ``--help``).
  Third-party imports inside functions (torch, ray, peft, lm_eval, ...) are not checked here.

Imports under ``if TYPE_CHECKING:`` are annotations only and are ignored.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "defences", "attacks", "metrics", "leaderboards")

# (package prefix, layer rank, group). Longest prefix wins.
LAYERS = [
    ("harness.api", 0, "api"),
    ("harness.components", 0, "api"),  # deprecated alias of harness.api.components
    ("harness.registry", 0, "api"),  # deprecated alias of harness.api.registry
    ("harness", 0, "api"),  # the package itself (version only)
    ("harness.presets", 0, "api"),
    ("harness.lib", 1, "lib"),
    ("harness.pipeline", 2, "pipeline"),
    ("defences", 2, "defences"),
    ("attacks", 2, "attacks"),
    ("metrics", 2, "metrics"),
    ("harness.sweep", 3, "sweep"),
    ("leaderboards", 3, "leaderboards"),
    ("harness.cli", 4, "cli"),
]

# (importer group, imported group) -> reason: the one same-layer direction allowed. The reverse stays
# forbidden, and test_no_import_cycles still applies.
SAME_LAYER_ALLOWED: dict[tuple[str, str], str] = {
    ("sweep", "leaderboards"): "the nightly runner (harness.sweep.nightly) runs a suite's sweep and compares its "
                               "records with the committed baseline through the leaderboard's pure functions; "
                               "leaderboards read records only and never start a sweep",
}

# importer prefix -> (imported prefix, reason). A function-level import of a project module must
# match one of these.
FUNCTION_LEVEL_ALLOWED: list[tuple[str, str, str]] = [
    ("harness.cli", "harness", "CLI fast path: a command imports the engine (torch, ray, pandas) only when it runs, "
                               "so `harness list`, `--help` and refused input stay under a second"),
    ("harness.cli", "leaderboards", "CLI fast path (pandas, matplotlib)"),
    ("harness.sweep.grid", "harness.pipeline.stages", "the stage list loads torch; `harness status` and sweep-file "
                                                      "validation read grid without it"),
    ("harness.sweep.execute", "harness.sweep.worker", "a Ray task imports the engine (torch, transformers) inside "
                                                      "its own timing and log, so the import is charged to the task"),
    ("leaderboards.plots", "harness.lib.analysis", "torch, for the weight-distance plot only; the leaderboard's "
                                                   "tables and other plots build without it"),
] + [(component, lib, "a component module imports the lib modules that load torch (training loop, layer finders, "
                      "checkpoint loader) in the functions that run, so validating its Config, and refusing bad "
                      "input, needs no torch (tests/test_cli_latency.py)")
     for component in ("defences", "attacks", "metrics")
     for lib in ("harness.lib.training", "harness.lib.layers", "harness.lib.models")]


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    function_level: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[module_name(path)] = path
    return out


MODULES = project_modules()


def layer(module: str) -> tuple[int, str]:
    best = max((p for p in LAYERS if module == p[0] or module.startswith(p[0] + ".")), key=lambda p: len(p[0]))
    return best[1], best[2]


def _resolve(name: str) -> str | None:
    """The project module ``name`` refers to (a module, or the package holding an imported name)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit(stmt, in_function)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = _resolve(alias.name)
                    if target and alias.name.split(".")[0] in PACKAGES:
                        found.append(Import(module, target, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)] if child.level > 1 else base
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                if source.split(".")[0] not in PACKAGES:
                    continue
                for alias in child.names:
                    target = _resolve(f"{source}.{alias.name}") or _resolve(source)
                    if target:
                        found.append(Import(module, target, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return [i for i in found if i.imported != module]


ALL_IMPORTS = [imp for m in MODULES for imp in imports_of(m)]


def _where(imp: Import) -> str:
    return f"{imp.importer}:{imp.line} imports {imp.imported}" + (" (in a function)" if imp.function_level else "")


def test_every_module_has_a_layer():
    assert all(layer(m) for m in MODULES)
    assert {"harness.api.registry", "harness.cli.main", "defences.repnoise"} <= set(MODULES)


def test_no_upward_or_sideways_imports():
    bad = []
    for imp in ALL_IMPORTS:
        (rank_a, group_a), (rank_b, group_b) = layer(imp.importer), layer(imp.imported)
        if rank_b > rank_a:
            bad.append(f"{_where(imp)}: {group_a} (layer {rank_a}) may not import {group_b} (layer {rank_b})")
        elif rank_b == rank_a and group_a != group_b and (group_a, group_b) not in SAME_LAYER_ALLOWED:
            bad.append(f"{_where(imp)}: {group_a} and {group_b} are one layer; neither imports the other")
    assert bad == []


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles():
    edges: dict[str, set[str]] = {}
    for imp in ALL_IMPORTS:
        # a package's __init__ importing its own submodules is not a cycle through the package
        if imp.imported.startswith(imp.importer + "."):
            continue
        edges.setdefault(imp.importer, set()).add(imp.imported)
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_only_where_allowed():
    bad = []
    for imp in ALL_IMPORTS:
        if not imp.function_level:
            continue
        if not any((imp.importer == a or imp.importer.startswith(a + ".")) and
                   (imp.imported == b or imp.imported.startswith(b + ".")) for a, b, _ in FUNCTION_LEVEL_ALLOWED):
            bad.append(_where(imp))
    assert bad == []


@pytest.mark.parametrize("src, expected", [
    ("import harness.lib.models\n", [("harness.lib.models", False)]),
    ("from harness.lib import models\n", [("harness.lib.models", False)]),
    ("from harness.lib.models import load_model\n", [("harness.lib.models", False)]),
    ("def f():\n    from harness.sweep import cost\n", [("harness.sweep.cost", True)]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from harness.lib.context import StageContext\n", []),
    ("import torch\nimport os\n", []),
])
def test_import_reader(tmp_path, monkeypatch, src, expected):
    path = ROOT / "harness" / "api" / "_probe_for_test_layers.py"
    monkeypatch.setitem(MODULES, "harness.api._probe_for_test_layers", path)
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: src if self == path else
                        Path.read_bytes(self).decode(encoding or "utf-8"))
    got = [(i.imported, i.function_level) for i in imports_of("harness.api._probe_for_test_layers")]
    assert got == expected
