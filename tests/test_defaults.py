"""Defaults live once: a default value (the paper's, mostly) is written in one place.

The place is the component's typed ``Config`` (or the spec's own models for ``eval``/``synth``).
A preset writes only what differs from those defaults; a subclass does not re-declare an
inherited default with the same value; a helper function in a component's module does not repeat
its component's defaults as keyword defaults; two training components of one kind do not each
write the same default for the same key (it belongs in their shared base).
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from collections import defaultdict
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from harness.api.components import TrainConfig
from harness.api.config import PRESET_DIR, EvalSpec, SynthSpec, preset_names
from harness.api.registry import ATTACKS, DATASETS, DEFENCES, METRICS, REGISTRIES, load_builtins

PRESETS = {name: yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text()) for name in preset_names()}


@pytest.fixture(scope="module", autouse=True)
def builtins():
    load_builtins()


#: the project's own components; test plug-ins other test modules register (``sweep_support``) are
#: fixtures, not defaults of the project, and would make these checks depend on test order
PROJECT_PACKAGES = ("harness", "defences", "attacks", "metrics")


def _project(registry) -> list[tuple[str, Any]]:
    return [(name, cls) for name, cls in registry.items() if cls.__module__.split(".")[0] in PROJECT_PACKAGES]


def _default(model: type[BaseModel], field: str) -> Any:
    info = model.model_fields[field]
    if info.default_factory is not None:
        return info.default_factory()
    return info.default


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _same(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b and type(a) is type(b)


def _own_defaults(model: type[BaseModel]) -> dict[str, Any]:
    """Defaults written in this class's own body (not inherited)."""
    out = {}
    for name in model.__dict__.get("__annotations__", {}):
        if name in model.model_fields:
            value = _default(model, name)
            if value is not PydanticUndefined:
                out[name] = value
    return out


def _literal(node: ast.AST | None) -> tuple[bool, Any]:
    """(True, value) when ``node`` is a literal, or ``Field(<literal>, ...)``; a name is a reference."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Field" and node.args:
        node = node.args[0]
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        return False, None


def _literal_defaults(model: type[BaseModel]) -> dict[str, Any]:
    """Defaults written as literals in this class's own body (``x: int = 4``, ``Field(4, ...)``)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(model)))
    except (OSError, TypeError):
        return {}
    out = {}
    for stmt in tree.body[0].body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            ok, value = _literal(stmt.value)
            if ok:
                out[stmt.target.id] = value
    return out


def _config_classes() -> dict[str, tuple[str, type[BaseModel]]]:
    """qualified name -> (registry kind, Config class) for every Config (and its bases) of a built-in."""
    out: dict[str, tuple[str, type[BaseModel]]] = {}
    for kind, registry in REGISTRIES.items():
        for _, cls in _project(registry):
            for base in cls.Config.__mro__:
                if isinstance(base, type) and issubclass(base, BaseModel) and base is not BaseModel:
                    out.setdefault(f"{base.__module__}.{base.__qualname__}", (kind, base))
    return out


def _preset_duplicates(name: str, preset: dict[str, Any]) -> list[str]:
    found = []

    def check(where: str, params: dict[str, Any], model: type[BaseModel]) -> None:
        for key, value in (params or {}).items():
            if key in model.model_fields and _same(value, _default(model, key)):
                found.append(f"preset {name}: {where}.{key} = {value!r} repeats the default of "
                             f"{model.__module__}.{model.__qualname__}")

    for kind, registry in (("defence", DEFENCES), ("attack", ATTACKS)):
        for comp, params in (preset.get(f"{kind}s") or {}).items():
            check(f"{kind}s.{comp}", params, registry.get(comp).Config)
        # a shared default that equals the default of any component it applies to is written twice
        for comp, cls in _project(registry):
            check(f"{kind}_defaults (for {comp})", preset.get(f"{kind}_defaults") or {}, cls.Config)
    ev = dict(preset.get("eval") or {})
    for metric, params in (ev.pop("params", None) or {}).items():
        check(f"eval.params.{metric}", params, METRICS.get(metric).Config)
    for key in ("harm_scorer", "toxicity_scorer"):
        scorer = ev.pop(key, None)
        if isinstance(scorer, dict):
            check(f"eval.{key}", {k: v for k, v in scorer.items() if k not in ("name", "fallback")},
                  METRICS.get(scorer["name"]).Config)
    check("eval", ev, EvalSpec)
    check("synth", preset.get("synth") or {}, SynthSpec)
    return found


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_write_only_what_differs_from_the_defaults(name):
    assert _preset_duplicates(name, PRESETS[name]) == []


def test_the_preset_check_can_fail():
    preset = {"defences": {"repnoise": {"beta": _default(DEFENCES.get("repnoise").Config, "beta")}},
              "attack_defaults": {"batch_size": 4}, "eval": {"samples": _default(EvalSpec, "samples")}}
    found = _preset_duplicates("probe", preset)
    assert any("defences.repnoise.beta" in f for f in found)
    assert any("attack_defaults (for harmfulqa).batch_size" in f for f in found)
    assert any("eval.samples" in f for f in found)


def test_subclasses_do_not_redeclare_an_inherited_default():
    found = []
    for qual, (_, model) in sorted(_config_classes().items()):
        for field, value in _own_defaults(model).items():
            for base in model.__mro__[1:]:
                if isinstance(base, type) and issubclass(base, BaseModel) and \
                        field in base.__dict__.get("__annotations__", {}):
                    if _same(value, _default(base, field)):
                        found.append(f"{qual}.{field} = {value!r} repeats {base.__qualname__}'s default")
                    break
    assert found == []


def test_training_components_of_one_kind_share_a_default_once():
    """E.g. the paper's attack lr written in both attack classes: it belongs in a common base."""
    seen: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for qual, (kind, model) in sorted(_config_classes().items()):
        if not issubclass(model, TrainConfig) or model is TrainConfig:
            continue
        for field, value in _literal_defaults(model).items():
            if value is None or value is False or value in ([], {}, ""):
                continue
            seen[(kind, field, repr(_plain(value)))].append(qual)
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}


def _function_literal_defaults(module) -> list[tuple[str, str, Any]]:
    """(function, parameter, value) for every keyword default written as a literal in ``module``."""
    tree = ast.parse(inspect.getsource(module))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = (args.posonlyargs + args.args)[len(args.posonlyargs + args.args) - len(args.defaults):]
            pairs = list(zip(positional, args.defaults)) + [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults)
                                                             if d is not None]
            for arg, default in pairs:
                ok, value = _literal(default)
                if ok and value is not None:
                    out.append((node.name, arg.arg, value))
    return out


def test_component_helpers_do_not_repeat_config_defaults():
    """A keyword default written as a literal in a component's module that equals its
    component's Config default is a second copy (RepNoise's beta was written in 5 places); the
    function refers to the one definition instead."""
    found = []
    for kind, registry in REGISTRIES.items():
        for name, cls in _project(registry):
            module = sys.modules[cls.__module__]
            defaults = {f: _default(cls.Config, f) for f in cls.Config.model_fields}
            for fname, param, value in _function_literal_defaults(module):
                if param in defaults and _same(value, defaults[param]):
                    found.append(f"{module.__name__}.{fname}({param}={value!r}) repeats {cls.__qualname__}.Config.{param}")
    assert found == []


def test_the_literal_checks_can_fail():
    src = "def loss(model, *, alpha=1.0, beta=PAPER_BETA, gamma=-2):\n    pass\n"
    module = type(sys)("probe")
    exec(compile(src, "probe", "exec"), {"PAPER_BETA": 1e-3}, module.__dict__)
    tree_defaults = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.FunctionDef):
            tree_defaults = [(a.arg, _literal(d)) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults)]
    assert tree_defaults == [("alpha", (True, 1.0)), ("beta", (False, None)), ("gamma", (True, -2))]
