"""Sweeps: a grid of trials expanded from YAML, and the stage DAG that runs them (no Ray in here).

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

Every cell is made by ``harness.api.config.resolve`` from the base preset, ``--defence/--attack/
--model/--seed`` and ``--set`` strings, exactly as ``harness run`` makes it, so a cell's trial id
equals the id ``harness run`` gives the same choices (``Cell.argv`` holds that command line).

Stages (the DAG)::

    data:<h>-<h>      missing answers/refusals generated (and cached) once per base model, for every
                      data draw of the sweep, before anything trains (no two stages race on the cache)
    base:<h>          extra evaluations of the base model (only with eval.extra and a real defence)
    defence:<key>     the defended checkpoint, once per spec.defence_key() (model, defence, its
                      config, seed, data); absent for `none`
    pre_attack:<key>:<h>  pre-attack scores, once per defended model and evaluation
    attack:<trial>    only for FSDP cells: the attack alone, on several GPUs, saved to storage
    cell:<trial>      attack + post-attack scores + the record (harness.pipeline.trial.run_trial)
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.api.config import RunSpec, format_validation_error, load_preset, parse_value, resolve
from harness.api.errors import ConfigError

STAGE_KINDS = ("data", "base", "defence", "pre_attack", "attack", "cell")
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

    @field_validator("isolate")
    @classmethod
    def _isolate(cls, v):
        if v not in ("process", "reuse"):
            raise ValueError("must be 'process' or 'reuse'")
        return v

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, v):
        from harness.sweep.cost import GPU_PROFILES

        if v not in GPU_PROFILES:
            raise ValueError(f"unknown GPU profile; known: {', '.join(GPU_PROFILES)}")
        return v

    @field_validator("resources")
    @classmethod
    def _resources(cls, v):
        for key, value in v.items():
            if key not in (*STAGE_KINDS, "default"):
                raise ValueError(f"unknown stage kind {key!r}; known: {', '.join((*STAGE_KINDS, 'default'))}")
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
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"sweep file {str(file)!r} does not exist")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep file {str(file)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {str(file)!r} must hold a mapping")
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


def _validate_spec(data: dict[str, Any], where: str) -> SweepSpec:
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
        import shlex

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
    grid_values = list(itertools.product(*(spec.grid[k] for k in grid_keys))) or [()]
    global_sets = spec.global_sets() + list(extra_sets)
    default_model = (base.get("model") or {}).get("id")
    default_seed = base.get("seed", 0)

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
        if any(all(labels.get(k) == v for k, v in rule.items()) for rule in spec.exclude):
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


def import_plugins(modules: Iterable[str]) -> None:
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"sweep plugin {module!r} cannot be imported: {exc}") from None


# ---------------------------------------------------------------------------------------------
# the DAG
# ---------------------------------------------------------------------------------------------
@dataclass
class Stage:
    id: str
    kind: str
    spec: RunSpec  # a representative cell's spec (all cells of this stage give the same result)
    deps: list[str]
    cells: list[str]  # trial ids that need this stage
    resources: Resources
    estimate_s: float
    estimate_detail: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    rank: float = 0.0  # longest estimated path from this stage to the end (scheduling priority)
    more_specs: list[RunSpec] = field(default_factory=list)  # data stage: one spec per distinct data draw

    @property
    def gpu_hours(self) -> float:
        return self.estimate_s * self.resources.total_gpus / 3600.0

    def payload(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "spec": self.spec.model_dump(mode="json"),
                "trial_id": self.spec.trial_id, "defence_key": self.spec.defence_key(),
                "workers": self.resources.workers, "use_gpu": self.resources.num_gpus > 0,
                "more_specs": [s.model_dump(mode="json") for s in self.more_specs]}


@dataclass
class Sweep:
    name: str
    preset: str
    spec: SweepSpec
    cells: list[Cell]
    stages: dict[str, Stage]  # topological order
    output: Path
    storage: Path

    @property
    def state_dir(self) -> Path:
        return self.output / SWEEP_DIR

    def cell(self, trial_id: str) -> Cell:
        return next(c for c in self.cells if c.trial_id == trial_id)

    def children(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {sid: [] for sid in self.stages}
        for st in self.stages.values():
            for dep in st.deps:
                out[dep].append(st.id)
        return out

    # ---- on-disk state (resume) ----------------------------------------------------------
    def stage_done(self, stage: Stage, finished: set[str]) -> bool:
        from harness.lib.checkpoints import is_complete

        if stage.kind == "cell":
            return stage.cells[0] in finished
        if stage.kind == "defence":
            return is_complete(self.storage / stage.spec.defence_key())
        if stage.kind == "attack":
            return is_complete(attacked_folder(self.storage, stage.spec.trial_id))
        marker = marker_path(self.storage, stage)
        if not marker.exists():
            return False
        try:
            target = Path(json.loads(marker.read_text())["path"])
        except (ValueError, KeyError, TypeError):
            return False
        return target.exists()

    def scan(self) -> tuple[set[str], set[str]]:
        """(finished trial ids, stages still to run): a stage runs only if an unfinished cell needs
        it and its output is not on disk yet."""
        from harness.lib.store import ResultStore

        store = ResultStore(self.output)
        finished = {c.trial_id for c in self.cells if store.is_finished(c.trial_id)}
        todo: set[str] = set()
        for st in self.stages.values():
            if all(t in finished for t in st.cells):
                continue
            if not self.stage_done(st, finished):
                todo.add(st.id)
        return finished, todo

    # ---- summary -------------------------------------------------------------------------
    def summary(self, todo: Optional[set[str]] = None, gpus: Optional[float] = None, cpus: float = 1e9) -> dict[str, Any]:
        kinds: dict[str, dict[str, Any]] = {}
        for st in self.stages.values():
            k = kinds.setdefault(st.kind, {"total": 0, "to_run": 0, "gpu_hours": 0.0, "gpu_hours_to_run": 0.0,
                                           "resources": set()})
            k["total"] += 1
            k["gpu_hours"] += st.gpu_hours
            r = st.resources
            k["resources"].add(f"{r.workers}x{r.num_gpus:g} GPU" if r.workers > 1 else f"{r.num_gpus:g} GPU")
            if todo is None or st.id in todo:
                k["to_run"] += 1
                k["gpu_hours_to_run"] += st.gpu_hours
        for k in kinds.values():
            k["resources"] = sorted(k["resources"])
            k["gpu_hours"] = round(k["gpu_hours"], 4)
            k["gpu_hours_to_run"] = round(k["gpu_hours_to_run"], 4)
        out: dict[str, Any] = {
            "name": self.name, "preset": self.preset, "cells": len(self.cells), "stages": kinds,
            "defence_trainings": kinds.get("defence", {}).get("to_run", 0),
            "attacks": sum(1 for s in self.stages.values() if s.kind == "cell" and (todo is None or s.id in todo)),
            "evaluations": sum(1 for s in self.stages.values() if (todo is None or s.id in todo)
                               and s.kind in ("pre_attack", "cell", "base")),
            "gpu_hours_to_run": round(sum(k["gpu_hours_to_run"] for k in kinds.values()), 4),
            "output": str(self.output), "storage": str(self.storage), "gpu_profile": self.spec.gpu,
        }
        if gpus:
            out["expected_makespan_s"] = round(simulate(self, gpus, cpus, todo), 1)
            out["gpus"] = gpus
        return out


def marker_path(storage: Path, stage: Stage) -> Path:
    """Where a pre_attack / base stage notes the file it produced (the file's name holds keys the
    driver cannot compute without reading data)."""
    if stage.kind == "pre_attack":
        return storage / stage.spec.defence_key() / f"stage-{stage.id.split(':')[-1]}.json"
    return storage / f"stage-{stage.id.replace(':', '-')}.json"


def attacked_folder(storage: Path, trial_id: str) -> Path:
    return Path(storage) / "attacked" / trial_id


def resources_for(spec: SweepSpec, kind: str, run_spec: RunSpec) -> tuple[Resources, float, dict[str, Any]]:
    """The stage's resources (from the sweep's ``resources`` or the cost model) and its estimate."""
    from harness.sweep import cost

    chosen = spec.resources.get(kind, spec.resources.get("default", "auto"))
    workers = chosen.workers if isinstance(chosen, Resources) else None
    est = cost.estimate(kind, run_spec, spec.gpu, workers=workers)
    if isinstance(chosen, Resources):
        res = chosen
    else:
        if est.gpus > 1 and kind in ("defence", "attack"):
            res = Resources(num_gpus=1, num_cpus=1, workers=int(est.gpus))
        else:
            res = Resources(num_gpus=min(est.gpus, 1.0), num_cpus=1)
    if run_spec.model.device == "cpu":
        res = res.model_copy(update={"num_gpus": 0.0})
    detail = {**est.detail, "memory_gb": round(est.memory_gb, 2), "auto_gpus": est.gpus}
    return res, est.seconds, detail


def build(spec: SweepSpec, preset: str, *, output: Optional[str] = None, storage: Optional[str] = None,
          models: Optional[list[str]] = None, extra_sets: Iterable[str] = (), name: Optional[str] = None) -> Sweep:
    """Expand the grid and build the stage DAG."""
    cells = expand(spec, preset, models=models, extra_sets=extra_sets)
    sweep_name = name or spec.name or "sweep"
    out = Path(output or spec.output or Path("results") / sweep_name)
    store = Path(storage or spec.storage or out / "checkpoints")
    stages: dict[str, Stage] = {}

    def add(sid: str, kind: str, rs: RunSpec, deps: list[str], trial_id: str, label: str) -> Stage:
        if sid not in stages:
            res, secs, detail = resources_for(spec, kind, rs)
            stages[sid] = Stage(sid, kind, rs, deps, [], res, secs, detail, label)
        st = stages[sid]
        if trial_id not in st.cells:
            st.cells.append(trial_id)
        return st

    # one data stage per base model: every distinct data draw of its cells
    draws: dict[str, dict[str, RunSpec]] = {}
    for cell in cells:
        c = cell.spec.canonical()
        draws.setdefault(_h({"model": c["model"], "synth": c["synth"]}), {}).setdefault(_draw_key(cell.spec),
                                                                                         cell.spec)
    data_ids = {mk: f"data:{mk}-{_h(sorted(group))}" for mk, group in draws.items()}

    for cell in cells:
        rs = cell.spec
        c = rs.canonical()
        deps: list[str] = []
        defended = rs.defence.name != "none"
        mk = _h({"model": c["model"], "synth": c["synth"]})
        data_id = data_ids[mk]
        if data_id not in stages:
            group = list(draws[mk].values())
            st = add(data_id, "data", group[0], [], cell.trial_id, f"data {cell.labels['model']}")
            st.more_specs = group[1:]
            from harness.sweep.cost import data_estimate

            est = data_estimate(group, spec.gpu)
            st.estimate_s, st.estimate_detail = est.seconds, {**est.detail, "draws": len(group)}
        else:
            add(data_id, "data", rs, [], cell.trial_id, "")
        if rs.eval.extra and defended:
            bid = f"base:{_h({'model': c['model'], 'eval': c['eval'], 'synth': c['synth']})}"
            add(bid, "base", rs, [data_id], cell.trial_id, f"base {cell.labels['model']}")
            deps.append(bid)
        dkey = rs.defence_key()
        pre_deps = []
        if defended:
            did = f"defence:{dkey}"
            add(did, "defence", rs, [data_id], cell.trial_id, f"{cell.labels['defence']} seed {cell.labels['seed']}")
            pre_deps.append(did)
        a = c["attack"]
        pre_h = _h({"eval": c["eval"], "eval_dataset": a.get("eval_dataset"), "attack": rs.attack.name,
                    "template": a.get("template"), "max_new": a.get("max_new_tokens"), "seed": c["seed"],
                    "disjoint": c["disjoint"]})
        pid = f"pre_attack:{dkey}:{pre_h}"
        add(pid, "pre_attack", rs, list(pre_deps) or [data_id], cell.trial_id,
            f"{cell.labels['defence']} seed {cell.labels['seed']} {cell.labels['eval']}")
        deps.append(pid)
        chosen = spec.resources.get("attack", spec.resources.get("cell", spec.resources.get("default", "auto")))
        if isinstance(chosen, Resources):
            fsdp = chosen.workers > 1
        else:  # auto: the cost model says whether the attack fits one GPU
            fsdp = resources_for(spec, "cell", rs)[2]["auto_gpus"] > 1
        if fsdp and _no_fsdp(spec, "attack", rs):
            fsdp = False
        if fsdp:
            aid = f"attack:{cell.trial_id}"
            st = add(aid, "attack", rs, list(pre_deps) or [data_id], cell.trial_id, _cell_label(cell))
            if isinstance(chosen, Resources):
                st.resources = chosen
            deps.append(aid)
        cid = f"cell:{cell.trial_id}"
        st = add(cid, "cell", rs, deps, cell.trial_id, _cell_label(cell))
        if fsdp:  # the cell is then only the post-attack evaluation on one GPU
            res, secs, detail = resources_for(spec, "post_attack", rs)
            st.resources, st.estimate_s, st.estimate_detail = res, secs, detail
    for st in stages.values():  # a defence that cannot train with FSDP keeps one GPU (and may not fit)
        if st.kind == "defence" and st.resources.workers > 1 and _no_fsdp(spec, "defence", st.spec):
            st.resources = st.resources.model_copy(update={"workers": 1, "num_gpus": 1.0})
    ordered = {sid: stages[sid] for kind in STAGE_KINDS for sid in stages if stages[sid].kind == kind}
    sweep = Sweep(sweep_name, preset, spec, cells, ordered, out, store)
    compute_ranks(sweep)
    return sweep


_WARNED: set[tuple[str, str]] = set()


def _no_fsdp(sweep_spec: SweepSpec, kind: str, rs: RunSpec) -> bool:
    """True (with one warning per defence) when ``kind`` of ``rs`` cannot train with FSDP."""
    import logging

    from harness.sweep.fsdp import unsupported_reason

    reason = unsupported_reason(kind, rs)
    if reason and (kind, rs.defence.name) not in _WARNED:
        _WARNED.add((kind, rs.defence.name))
        logging.getLogger("harness.sweep.grid").warning("%s stages of %s: %s; they get one GPU each", kind,
                                                   rs.defence.name, reason)
    return reason is not None


def _draw_key(spec: RunSpec) -> str:
    """What a cell's data draw depends on: seed, disjointness and each role's dataset, size, needs."""
    from harness.lib import data as datamod
    from harness.api.config import attack_config, defence_config
    from harness.api.registry import DEFENCES

    reqs = datamod.requests_for(spec, DEFENCES.get(spec.defence.name), defence_config(spec), attack_config(spec))
    return _h({"seed": spec.seed, "disjoint": spec.disjoint,
               "requests": [(r.role, datamod.ref_key(r.ref), r.n, list(r.needs)) for r in reqs]})


def _cell_label(cell: Cell) -> str:
    lab = cell.labels
    bits = [lab["defence"], lab["attack"]]
    if lab.get("attack_lr") is not None:
        bits.append(f"lr {lab['attack_lr']:g}")
    if lab.get("attack_samples") is not None:
        bits.append(f"n {lab['attack_samples']}")
    bits.append(f"seed {lab['seed']}")
    return " ".join(str(b) for b in bits)


def compute_ranks(sweep: Sweep, durations: Optional[dict[str, float]] = None) -> None:
    """Upward rank (HEFT): a stage's duration plus the longest rank among the stages after it."""
    children = sweep.children()
    for sid in reversed(list(sweep.stages)):
        st = sweep.stages[sid]
        d = (durations or {}).get(sid, st.estimate_s)
        st.rank = d + max((sweep.stages[c].rank for c in children[sid]), default=0.0)


def simulate(sweep: Sweep, gpus: float, cpus: float = 1e9, todo: Optional[set[str]] = None,
             durations: Optional[dict[str, float]] = None) -> float:
    """Makespan of the list scheduler (`harness.sweep.runner`) under the cost model's durations."""
    import heapq

    todo = set(sweep.stages) if todo is None else set(todo)
    dur = {sid: (durations or {}).get(sid, sweep.stages[sid].estimate_s) for sid in todo}
    waiting = {sid: {d for d in sweep.stages[sid].deps if d in todo} for sid in todo}
    children = sweep.children()
    ready = [sid for sid, deps in waiting.items() if not deps]
    running: list[tuple[float, str]] = []
    t, free_g, free_c = 0.0, gpus, cpus
    while ready or running:
        ready.sort(key=lambda s: -sweep.stages[s].rank)
        started = True
        while started:
            started = False
            for sid in list(ready):
                r = sweep.stages[sid].resources
                if (r.total_gpus <= free_g + 1e-9 and r.total_cpus <= free_c + 1e-9) or not running:
                    free_g -= r.total_gpus
                    free_c -= r.total_cpus
                    heapq.heappush(running, (t + dur[sid], sid))
                    ready.remove(sid)
                    started = True
                    break
        if not running:
            break
        t, sid = heapq.heappop(running)
        r = sweep.stages[sid].resources
        free_g += r.total_gpus
        free_c += r.total_cpus
        for ch in children[sid]:
            if ch in waiting:
                waiting[ch].discard(sid)
                if not waiting[ch] and ch not in ready and all(ch != s for _, s in running):
                    ready.append(ch)
    return t


def format_plan(sweep: Sweep, summary: dict[str, Any]) -> str:
    from harness.sweep.cost import describe

    lines = [f"sweep {sweep.name}: {len(sweep.cells)} cells (preset {sweep.preset}) -> {sweep.output}",
             f"checkpoints: {sweep.storage}",
             f"{'stage':<11} {'total':>6} {'to run':>7} {'GPU-h (to run)':>15}  resources"]
    for kind in STAGE_KINDS:
        k = summary["stages"].get(kind)
        if k:
            lines.append(f"{kind:<11} {k['total']:>6} {k['to_run']:>7} {k['gpu_hours_to_run']:>15.3f}  "
                         f"{', '.join(k['resources'])}")
    lines.append(f"defence trainings {summary['defence_trainings']}, attacks {summary['attacks']}, "
                 f"evaluations {summary['evaluations']} (to run)")
    lines.append(f"expected GPU hours: {summary['gpu_hours_to_run']:.3f}")
    if "expected_makespan_s" in summary:
        lines.append(f"expected makespan on {summary['gpus']:g} GPU(s): {format_seconds(summary['expected_makespan_s'])}")
    lines.append(describe(sweep.spec.gpu))
    return "\n".join(lines)


def format_seconds(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


def plan_json(sweep: Sweep, todo: Optional[set[str]] = None) -> dict[str, Any]:
    return {"name": sweep.name, "preset": sweep.preset,
            "cells": [{"trial_id": c.trial_id, "labels": c.labels, "command": c.command()} for c in sweep.cells],
            "stages": [{"id": s.id, "kind": s.kind, "deps": s.deps, "cells": s.cells, "label": s.label,
                        "resources": s.resources.model_dump(), "estimate_s": round(s.estimate_s, 2),
                        "to_run": todo is None or s.id in todo} for s in sweep.stages.values()]}


def copy_spec(spec: SweepSpec, **changes: Any) -> SweepSpec:
    data = copy.deepcopy(spec.model_dump())
    data.update(changes)
    return _validate_spec(data, "sweep")
