"""Sweeps: the sweep file and the grid of trials it expands to (no Ray, no model in here).

A sweep file (``harness sweep SPEC.yaml``) or the ``sweep:`` section of a preset
(``harness sweep --preset paper``) names the axes of a grid::

    preset: smoke                  # base preset (name or YAML path); omitted inside a preset's sweep:
    name: my-sweep                 # default: the file's stem / the preset's name
    models: [smollm2-135m-instruct]          # --model values; default: the preset's model
    defences:                      # names, or {name, label, set: {param: value}} / {name, param: value}
      - none
      - {name: repnoise, label: repnoise-b1e-3, beta: 0.001}
    attacks: [harmfulqa]           # names or {name, label, set: {...}}; default: the preset's attack
    attack_lr: [3.0e-5, 6.0e-5, 8.0e-5]      # -> --set attack.lr=...
    attack_samples: [1000, 10000]  # -> --set attack.samples=...
    seeds: [24, 48, 0, 1, 2, 3]    # -> --seed
    evals: [{label: default}]      # eval variants: {label, set: {eval key: value}} or {eval key: value}
    grid: {defence.freeze_layers: [0, 8]}    # any other dotted key -> list of values (cartesian)
    set: {eval.samples: 300}       # --set applied to every cell (before the axes)
    exclude: [{defence: none, seed: 48}]     # drop cells whose labels match all given keys
    plugins: [my_pkg.components]   # modules imported by the driver and every stage (registrations)
    output: results/paper          # records folder; default results/<name>
    storage: /shared/ckpt          # defended checkpoints; default OUTPUT/checkpoints (must be seen by all nodes)
    retries: 2                     # extra attempts of a failed stage
    gpu: h100                      # cost-model profile (harness.sweep.cost.GPU_PROFILES)
    resources:                     # per stage kind (base, defence, pre_attack, attack, cell, default): auto or
      default: auto                #   {num_gpus, num_cpus, memory_gb, workers}; workers > 1 trains with FSDP
      defence: {num_gpus: 1}
    isolate: process               # process: every stage in a fresh worker (frees GPU memory); reuse: gc only
    scorer_service: true           # API scorers (Perspective) score in one CPU-only Ray actor for the whole
                                   #   sweep: one rate limit and cache (the calling stage waits for it)
    search: {budget: 16, epsilon: 0.1}   # `harness search FILE`: worst-case attack search per defence x attack
                                   #   instead of the grid (harness.sweep.search); `harness sweep` ignores it

Every cell is made by ``harness.api.config.resolve`` from the base preset, ``--defence/--attack/
--model/--seed`` and ``--set`` strings, exactly as ``harness run`` makes it, so a cell's trial id
equals the id ``harness run`` gives the same choices (``Cell.argv`` holds that command line).

The stage DAG built from the cells is ``harness.sweep.dag`` (derived from the trial's stage list,
``harness.pipeline.stages.STAGES``); ``harness.sweep.runner`` runs it on Ray.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib
import itertools
import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.api import safeio
from harness.api.config import RunSpec, format_validation_error, load_preset, parse_value, resolve
from harness.api.errors import ConfigError
from harness.lib.model_files import check_local_model, looks_like_path
from harness.sweep import cost

def stage_kinds() -> tuple[str, ...]:
    """The sweep's stage (task) kinds, from the trial's stage list (``harness.pipeline.stages``;
    imported here, not at the top, because it loads torch and this module is read by ``harness
    status``)."""
    from harness.pipeline.stages import task_kinds

    return task_kinds()


AXES = ("models", "defences", "attacks", "attack_lr", "attack_samples", "seeds", "evals")
#: cells a sweep may expand to unless ``max_cells`` (or ``harness sweep --max-cells N``) raises it: each
#: cell is resolved and validated like ``harness run`` (milliseconds each) before anything runs
DEFAULT_MAX_CELLS = 5000


SWEEP_DIR = "_sweep"  # inside the results folder: state.json, plan.json, logs/, driver.lock


def _h(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


# ---------------------------------------------------------------------------------------------
# the sweep file
# ---------------------------------------------------------------------------------------------
class Entry(BaseModel):
    """One value of a component axis: a name, a label, and ``--set`` parameters under its prefix."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Optional[str] = None
    label: Optional[str] = None
    set: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any, axis: str, named: bool = True) -> "Entry":
        if isinstance(value, str) and named:
            return cls(name=value)
        if not isinstance(value, dict):
            raise ConfigError(f"sweep {axis}: entry {value!r} must be a name or a mapping")
        value = dict(value)
        params = dict(value.pop("set", None) or {})
        label, name = value.pop("label", None), value.pop("name", None)
        params.update(value)  # shorthand: other keys are parameters
        if named and not name:
            raise ConfigError(f"sweep {axis}: entry {value!r} needs a 'name'")
        return cls(name=name, label=label, set=params)

    def tag(self, default: str = "") -> str:
        if self.label:
            return self.label
        base = self.name or default
        if not self.set:
            return base
        bits = ",".join(f"{k}={v}" for k, v in sorted(self.set.items()) if not isinstance(v, (dict, list)))
        return f"{base}[{bits or _h(self.set, 6)}]"


class Resources(BaseModel):
    """What one stage asks Ray for. ``workers`` > 1: an FSDP job of that many GPU workers
    (``num_gpus`` is then per worker)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_gpus: float = Field(1.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    memory_gb: Optional[float] = Field(None, gt=0)
    workers: int = Field(1, ge=1)

    @property
    def total_gpus(self) -> float:
        return self.num_gpus * self.workers

    @property
    def total_cpus(self) -> float:
        return self.num_cpus * self.workers


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    preset: Optional[str] = None
    name: Optional[str] = None
    description: Optional[str] = None
    models: list[str] = Field(default_factory=list)
    defences: list[Any] = Field(default_factory=list)
    attacks: list[Any] = Field(default_factory=list)
    attack_lr: list[float] = Field(default_factory=list)
    attack_samples: list[int] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=list)
    evals: list[Any] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    set: Union[dict[str, Any], list[str]] = Field(default_factory=dict)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    plugins: list[str] = Field(default_factory=list)
    output: Optional[str] = None
    storage: Optional[str] = None
    retries: int = Field(2, ge=0)
    gpu: str = "h100"
    resources: dict[str, Union[str, Resources]] = Field(default_factory=dict)
    isolate: str = "process"
    scorer_service: bool = True  # API scorers (Perspective) run in one CPU-only actor with one rate limit
    max_cells: int = Field(DEFAULT_MAX_CELLS, gt=0)  # refuse a grid of more cells (harness sweep --max-cells)
    search: Optional[dict[str, Any]] = None  # worst-case attack search (harness search FILE; harness.sweep.search)

    @field_validator("isolate")
    @classmethod
    def _isolate(cls, v):
        if v not in ("process", "reuse"):
            raise ValueError("must be 'process' or 'reuse'")
        return v

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, v):
        if v not in cost.GPU_PROFILES:
            raise ValueError(f"unknown GPU profile; known: {', '.join(cost.GPU_PROFILES)}")
        return v

    @field_validator("resources")
    @classmethod
    def _resources(cls, v):
        for key, value in v.items():
            kinds = (*stage_kinds(), "default")
            if key not in kinds:
                raise ValueError(f"unknown stage kind {key!r}; known: {', '.join(kinds)}")
            if isinstance(value, str) and value != "auto":
                raise ValueError(f"{key}: 'auto' or a mapping of num_gpus/num_cpus/memory_gb/workers")
        return v

    def global_sets(self) -> list[str]:
        if isinstance(self.set, list):
            return list(self.set)
        return [f"{k}={format_value(v)}" for k, v in self.set.items()]


def format_value(value: Any) -> str:
    """``value`` as the text of a ``--set key=TEXT`` that parses back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    if text.endswith("..."):
        text = text[:-3].strip()
    if parse_value(text) != value:
        text = json.dumps(value)
    if parse_value(text) != value:
        raise ConfigError(f"sweep: value {value!r} cannot be written as a --set value (it would parse as "
                          f"{parse_value(text)!r})")
    return text


def load_sweep_spec(path: Optional[str] = None, preset: Optional[str] = None) -> tuple[SweepSpec, str, Optional[Path]]:
    """Read a sweep file, or the ``sweep:`` section of a preset. Returns (spec, base preset, file)."""
    if path is None and preset is None:
        raise ConfigError("harness sweep: give a sweep file or --preset NAME (a preset with a 'sweep:' section)")
    if path is None:
        raw = load_preset(preset)
        section = raw.get("sweep")
        if not isinstance(section, dict):
            raise ConfigError(f"preset {preset!r} has no 'sweep:' section")
        if "preset" in section:
            raise ConfigError(f"preset {preset!r}: 'sweep.preset' is not allowed (the sweep runs on its own preset)")
        data = dict(section)
        data.setdefault("name", raw.get("preset", Path(preset).stem))
        return _validate_spec(data, f"preset {preset!r} sweep"), preset, None
    file = safeio.check_path(path, "sweep file")
    raw = safeio.load_yaml(file, "sweep file")  # no folders, FIFOs, binary, oversized files or alias bombs
    if raw is None:
        raise ConfigError(f"sweep file {str(file)!r} is empty; it must hold a mapping (defences: [...], ...)")
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {str(file)!r} must hold a mapping, not {type(raw).__name__}")
    if "sweep" in raw:  # a preset file that carries its own sweep section
        return load_sweep_spec(None, str(file) if preset is None else preset)
    data = dict(raw)
    data.setdefault("name", file.stem)
    base = preset or data.get("preset") or "smoke"
    base_path = Path(base)
    if base_path.suffix and not base_path.is_absolute() and not base_path.exists() and (file.parent / base_path).exists():
        base = str(file.parent / base_path)
    data["preset"] = base
    return _validate_spec(data, f"sweep file {str(file)!r}"), base, file


def _validate_spec(data: dict[str, Any], where: str, written: bool = True) -> SweepSpec:
    """``data`` as a ``SweepSpec``; ``written``: it is what a user wrote (not a copy of a validated
    spec, whose absent axes are empty lists), so an axis given but empty is refused."""
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{where}: key {bad_keys[0]!r} is not a string")
    # an axis written but left empty would be dropped (the preset's default used instead): refuse it
    for axis in AXES if written else ():
        if axis in data and isinstance(data[axis], (list, tuple)) and not data[axis]:
            raise ConfigError(f"{where}: axis '{axis}' is empty; give at least one value or leave the key out "
                              "(then the preset's value is used)")
    name = data.get("name")
    if isinstance(name, str) and (not name.strip() or "/" in name or "\\" in name or name in (".", "..")):
        raise ConfigError(f"{where}: name {name!r} must be one folder name (it names results/<name>), not a path; "
                          "set output: for another folder")
    grid = data.get("grid")
    if isinstance(grid, dict) and written:
        for key, values in grid.items():
            if isinstance(values, (list, tuple)) and not values:
                raise ConfigError(f"{where}: grid axis {key!r} is empty; give at least one value or remove it")
    try:
        return SweepSpec(**data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: " + format_validation_error(exc, model=SweepSpec)) from None


# ---------------------------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------------------------
@dataclass
class Cell:
    index: int
    spec: RunSpec
    labels: dict[str, Any]
    argv: list[str]  # `harness run` arguments that make the same trial

    @property
    def trial_id(self) -> str:
        return self.spec.trial_id

    def command(self) -> str:
        return "harness run " + " ".join(shlex.quote(a) for a in self.argv)


def expand(spec: SweepSpec, preset: str, *, models: Optional[list[str]] = None,
           extra_sets: Iterable[str] = ()) -> list[Cell]:
    """The grid's cells, in a stable order, each resolved and validated like `harness run`."""
    import_plugins(spec.plugins)
    base = load_preset(preset)
    model_axis: list[Optional[str]] = list(models or spec.models) or [None]
    defences = [Entry.parse(d, "defences") for d in spec.defences] or [Entry(name=base.get("defence") or "none")]
    attacks = [Entry.parse(a, "attacks") for a in spec.attacks] or [Entry(name=base.get("attack") or "harmfulqa")]
    lrs: list[Optional[float]] = list(spec.attack_lr) or [None]
    samples: list[Optional[int]] = list(spec.attack_samples) or [None]
    seeds: list[Optional[int]] = list(spec.seeds) or [None]
    evals = [Entry.parse(e, "evals", named=False) for e in spec.evals] or [Entry()]
    grid_keys = list(spec.grid)
    axes = {"models": model_axis, "defences": defences, "seeds": seeds, "attacks": attacks, "attack_lr": lrs,
            "attack_samples": samples, "evals": evals, **{f"grid.{k}": spec.grid[k] for k in grid_keys}}
    check_cell_count(axes, spec.max_cells)  # counted, never expanded, before anything is resolved
    check_models(model_axis)
    grid_values = list(itertools.product(*(spec.grid[k] for k in grid_keys))) or [()]
    global_sets = spec.global_sets() + list(extra_sets)
    default_model = (base.get("model") or {}).get("id")
    default_seed = base.get("seed", 0)
    check_exclude(spec.exclude, {
        "model": [m or default_model for m in model_axis], "defence": [d.tag() for d in defences],
        "attack": [a.tag() for a in attacks], "attack_lr": lrs, "attack_samples": samples,
        "seed": [s if s is not None else default_seed for s in seeds], "eval": [e.tag("default") for e in evals],
        **{k: list(spec.grid[k]) for k in grid_keys}})

    cells: list[Cell] = []
    seen: dict[str, Cell] = {}
    for model, d, seed, a, lr, n, ev, gv in itertools.product(model_axis, defences, seeds, attacks, lrs, samples,
                                                                  evals, grid_values):
        sets = list(global_sets)
        sets += [f"defence.{k}={format_value(v)}" for k, v in d.set.items()]
        sets += [f"attack.{k}={format_value(v)}" for k, v in a.set.items()]
        if lr is not None:
            sets.append(f"attack.lr={format_value(lr)}")
        if n is not None:
            sets.append(f"attack.samples={format_value(n)}")
        sets += [f"eval.{k}={format_value(v)}" for k, v in ev.set.items()]
        sets += [f"{k}={format_value(v)}" for k, v in zip(grid_keys, gv)]
        labels: dict[str, Any] = {"model": model or default_model, "defence": d.tag(), "attack": a.tag(),
                                  "attack_lr": lr, "attack_samples": n,
                                  "seed": seed if seed is not None else default_seed,
                                  "eval": ev.tag("default"), **dict(zip(grid_keys, gv))}
        if any(all(_same(v, labels.get(k)) for k, v in rule.items()) for rule in spec.exclude):
            continue
        argv = ["--preset", preset, "--defence", d.name, "--attack", a.name]
        if model is not None:
            argv += ["--model", model]
        if seed is not None:
            argv += ["--seed", str(seed)]
        for s in sets:
            argv += ["--set", s]
        try:
            run_spec = resolve(preset, defence=d.name, attack=a.name, model=model, seed=seed, sets=sets)
        except ConfigError as exc:
            raise ConfigError(f"sweep cell {labels}: {exc}") from None
        cell = Cell(len(cells), run_spec, labels, argv)
        if cell.trial_id in seen:
            continue  # two axis values that mean the same trial (e.g. a parameter at its default)
        seen[cell.trial_id] = cell
        cells.append(cell)
    if not cells:
        raise ConfigError("sweep: the grid is empty (every cell excluded?)")
    return cells


def check_cell_count(axes: dict[str, list[Any]], limit: int) -> int:
    """The number of cells of the grid (the product of its axis lengths, before exclusions), or a
    ``ConfigError`` saying how many and which axes when it is over ``limit``."""
    n = math.prod(len(v) for v in axes.values())
    if n > limit:
        shape = " x ".join(f"{len(v)} {k}" for k, v in axes.items() if len(v) > 1)
        raise ConfigError(f"sweep: the grid has {n:,} cells ({shape}), over the limit of {limit:,}; narrow an axis, "
                          f"or raise the limit with --max-cells {n} (or max_cells: {n} in the sweep file)")
    return n


def check_models(models: Iterable[Optional[str]]) -> None:
    """Every model of the models axis is a non-empty id; one that names a folder is a whole model
    folder (``harness.lib.model_files``), checked now, in the dry run, not in a Ray task."""
    for model in models:
        if model is None:
            continue
        if not isinstance(model, str) or not model.strip():
            raise ConfigError(f"sweep models: {model!r} is not a model id or folder (an unset shell variable?)")
        if looks_like_path(model):
            check_local_model(model, field="sweep models")


def _same(rule_value: Any, axis_value: Any) -> bool:
    if rule_value == axis_value:
        return True
    if isinstance(rule_value, str) and isinstance(axis_value, (int, float)) and not isinstance(axis_value, bool):
        try:  # 3e-5 in YAML is text (YAML wants 3.0e-5): compare it as the number it spells
            return float(rule_value) == float(axis_value)
        except ValueError:
            return False
    return False


def check_exclude(rules: list[dict[str, Any]], labels: dict[str, list[Any]]) -> None:
    """Each ``exclude`` rule names only keys of the cells' labels, and each value is a value of that
    axis: a misspelled key or value would match no cell and exclude nothing, silently."""
    for i, rule in enumerate(rules):
        if not rule:
            raise ConfigError(f"sweep exclude[{i}]: empty rule (it would exclude every cell)")
        for key, value in rule.items():
            if key not in labels:
                close = difflib.get_close_matches(str(key), list(labels), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"sweep exclude[{i}]: key {key!r} is not an axis.{hint} Keys: {', '.join(labels)}")
            values = [v for v in labels[key] if v is not None]
            if not any(_same(value, v) for v in labels[key]):
                shown = ", ".join(repr(v) for v in dict.fromkeys(map(str, values))) or "(the preset's default only)"
                raise ConfigError(f"sweep exclude[{i}]: {key} = {value!r} matches no value of that axis; its values: "
                                  f"{shown}")


def import_plugins(modules: Iterable[str]) -> None:
    for module in modules:
        if not isinstance(module, str) or not module.strip():
            raise ConfigError(f"sweep plugins: {module!r} is not a module name (e.g. my_pkg.components)")
        try:
            importlib.import_module(module)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"sweep plugin {module!r} cannot be imported: {exc}") from None


def copy_spec(spec: SweepSpec, **changes: Any) -> SweepSpec:
    data = copy.deepcopy(spec.model_dump())
    data.update(changes)
    return _validate_spec(data, "sweep", written=False)


def format_seconds(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"
