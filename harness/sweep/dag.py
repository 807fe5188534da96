"""The task DAG of a sweep (no Ray in here), derived from the trial's stage list.

A sweep runs the stages of ``harness.pipeline.stages.STAGES`` for every cell, sharing what cells
have in common: each ``Stage.task`` is one kind of Ray task, and cells with the same output share
one task. With the stage list as it is::

    data:<h>-<h>      missing answers/refusals generated (and cached) once per base model, for every
                      data draw of the sweep, before anything trains (no two stages race on the cache)
    base:<h>          extra evaluations of the base model, per seed and eval data (only with eval.extra and
                      a real defence)
    defence:<key>     the defended checkpoint, once per spec.defence_key() (model, defence, its
                      config, seed, data); absent for `none`
    pre_attack:<key>:<h>  pre-attack scores, once per defended model and evaluation
    attack:<trial>    only for FSDP cells: the attack alone, on several GPUs, saved to storage
    cell:<trial>      attack + post-attack scores + the record (harness.pipeline.trial.run_trial)

Resume: a task runs only if an unfinished cell needs it and its output is not on disk
(``Sweep.scan``). ``simulate`` is the list scheduler of ``harness.sweep.runner`` under the cost
model's durations (``--dry-run``'s makespan).
"""

from __future__ import annotations

import heapq
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from harness.api import safeio
from harness.api.config import RunSpec, attack_config, defence_config
from harness.api.registry import DEFENCES
from harness.lib import data as datamod
from harness.lib.checkpoints import is_complete
from harness.lib.store import ResultStore
from harness.pipeline import stages
from harness.sweep import cost
from harness.sweep.fsdp import unsupported_reason
from harness.sweep.grid import SWEEP_DIR, Cell, Resources, SweepSpec, _h, expand, format_seconds

log = logging.getLogger("harness.sweep.dag")


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
    """Where a pre_attack / base / data task notes the file it produced (the file's name holds keys
    the driver cannot compute without reading data)."""
    return stage_marker(storage, stage.kind, stage.id, stage.spec)


def stage_marker(storage: Path, kind: str, stage_id: str, spec: RunSpec) -> Path:
    if kind == "pre_attack":
        return storage / spec.defence_key() / f"stage-{stage_id.split(':')[-1]}.json"
    return storage / f"stage-{stage_id.replace(':', '-')}.json"


def attacked_folder(storage: Path, trial_id: str) -> Path:
    return Path(storage) / "attacked" / trial_id


def resources_for(spec: SweepSpec, kind: str, run_spec: RunSpec) -> tuple[Resources, float, dict[str, Any]]:
    """The stage's resources (from the sweep's ``resources`` or the cost model) and its estimate."""
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


def _task_id(kind: str, cell: Cell) -> str:
    """The id of the task of kind ``kind`` that ``cell`` needs: cells that share the output share the id."""
    rs, c = cell.spec, cell.spec.canonical()
    if kind == "base":
        a = c["attack"]  # what base_extras_path keys the cached extras on (eval data: seed, draw, eval set)
        base_h = _h({"model": c["model"], "eval": c["eval"], "synth": c["synth"], "seed": c["seed"],
                     "disjoint": c["disjoint"], "eval_dataset": a.get("eval_dataset"),
                     "template": a.get("template"), "separator": a.get("separator")})
        return f"base:{base_h}"
    if kind == "defence":
        return f"defence:{rs.defence_key()}"
    if kind == "pre_attack":
        a = c["attack"]
        pre_h = _h({"eval": c["eval"], "eval_dataset": a.get("eval_dataset"), "attack": rs.attack.name,
                    "template": a.get("template"), "max_new": a.get("max_new_tokens"), "seed": c["seed"],
                    "disjoint": c["disjoint"]})
        return f"pre_attack:{rs.defence_key()}:{pre_h}"
    return f"{kind}:{cell.trial_id}"  # attack, cell, and any per-trial task


def _task_label(kind: str, cell: Cell) -> str:
    lab = cell.labels
    if kind in ("data", "base"):
        return f"{kind} {lab['model']}"
    if kind == "defence":
        return f"{lab['defence']} seed {lab['seed']}"
    if kind == "pre_attack":
        return f"{lab['defence']} seed {lab['seed']} {lab['eval']}"
    return _cell_label(cell)


def _fsdp_attack(spec: SweepSpec, rs: RunSpec) -> bool:
    """Whether the cell's attack trains on several GPUs (a task of its own) or in the cell's task."""
    chosen = spec.resources.get("attack", spec.resources.get("cell", spec.resources.get("default", "auto")))
    if isinstance(chosen, Resources):
        fsdp = chosen.workers > 1
    else:  # auto: the cost model says whether the attack fits one GPU
        fsdp = resources_for(spec, "cell", rs)[2]["auto_gpus"] > 1
    return fsdp and not _no_fsdp(spec, "attack", rs)


def cell_tasks(spec: SweepSpec, rs: RunSpec) -> tuple[dict[str, str], bool]:
    """Which task runs each trial stage (``harness.pipeline.stages.STAGES``) of the cell ``rs``:
    stage name -> task kind, for the stages that apply to it and have a task (a stage without one,
    setup, runs in every task); an FSDP-only task without FSDP belongs to the cell's final task.
    Returns that map and whether the attack trains with FSDP."""
    pipeline = stages.STAGES
    final = pipeline[-1].task
    fsdp = _fsdp_attack(spec, rs)
    owner: dict[str, str] = {}
    for st in pipeline:
        if st.task is None or not st.applies(rs):
            continue  # run by every task / nothing to run
        own = st.task is not None and not (st.split_only_with_fsdp and not fsdp)
        owner[st.name] = st.task if own else final
    return owner, fsdp


def build(spec: SweepSpec, preset: str, *, output: Optional[str] = None, storage: Optional[str] = None,
          models: Optional[list[str]] = None, extra_sets: Iterable[str] = (), name: Optional[str] = None) -> Sweep:
    """Expand the grid and build the task DAG from the trial's stage list: a cell needs one task per
    ``Stage.task`` of the stages that apply to it (shared by the cells with the same output, see
    ``_task_id``); a task depends on the tasks of the stages its stages ``need`` (a stage that does
    not apply passes its own needs on), minus those reachable through another dependency."""
    cells = expand(spec, preset, models=models, extra_sets=extra_sets)
    sweep_name = name or spec.name or "sweep"
    out = safeio.check_output_dir(output or spec.output or Path("results") / sweep_name, "sweep results folder (--output)")
    store = safeio.check_output_dir(storage or spec.storage or out / "checkpoints", "sweep storage folder (--storage)")
    by_name = {st.name: st for st in stages.STAGES}
    tasks: dict[str, Stage] = {}

    # one data task per base model: every distinct data draw of its cells
    draws: dict[str, dict[str, RunSpec]] = {}
    for cell in cells:
        c = cell.spec.canonical()
        draws.setdefault(_h({"model": c["model"], "synth": c["synth"]}), {}).setdefault(_draw_key(cell.spec),
                                                                                         cell.spec)
    data_ids = {mk: f"data:{mk}-{_h(sorted(group))}" for mk, group in draws.items()}

    for cell in cells:
        rs = cell.spec
        c = rs.canonical()
        owner, fsdp = cell_tasks(spec, rs)
        mk = _h({"model": c["model"], "synth": c["synth"]})
        ids = {kind: data_ids[mk] if kind == "data" else _task_id(kind, cell) for kind in set(owner.values())}

        def needed(stage_name: str, kind: str) -> list[str]:
            """Task ids the stage ``stage_name`` (read by a stage of task ``kind``) stands for."""
            if stage_name in owner:
                return [] if owner[stage_name] == kind else [ids[owner[stage_name]]]
            if by_name[stage_name].task is None:
                return []  # every task runs it (setup)
            return [d for n in by_name[stage_name].needs for d in needed(n, kind)]  # not applicable: its needs

        for kind in dict.fromkeys(owner[st.name] for st in stages.STAGES if st.name in owner):
            deps: list[str] = []
            for st in stages.STAGES:
                if owner.get(st.name) == kind:
                    deps += [d for n in st.needs for d in needed(n, kind) if d not in deps]
            deps = [d for d in deps if not any(d in _ancestors(tasks, o) for o in deps if o != d)]
            tid = ids[kind]
            if tid not in tasks:
                res, secs, detail = resources_for(spec, kind, rs)
                tasks[tid] = Stage(tid, kind, rs, deps, [], res, secs, detail, _task_label(kind, cell))
            if cell.trial_id not in tasks[tid].cells:
                tasks[tid].cells.append(cell.trial_id)
            if kind == "data" and len(tasks[tid].cells) == 1:
                group = list(draws[mk].values())
                st = tasks[tid]
                st.spec, st.more_specs = group[0], group[1:]
                est = cost.data_estimate(group, spec.gpu)
                st.estimate_s, st.estimate_detail = est.seconds, {**est.detail, "draws": len(group)}
            if kind == "attack":
                chosen = spec.resources.get("attack", spec.resources.get("cell", spec.resources.get("default")))
                if isinstance(chosen, Resources):
                    tasks[tid].resources = chosen
            if kind == "cell" and fsdp:  # the cell is then only the post-attack evaluation on one GPU
                st = tasks[tid]
                st.resources, st.estimate_s, st.estimate_detail = resources_for(spec, "post_attack", rs)
    for st in tasks.values():  # a defence that cannot train with FSDP keeps one GPU (and may not fit)
        if st.kind == "defence" and st.resources.workers > 1 and _no_fsdp(spec, "defence", st.spec):
            st.resources = st.resources.model_copy(update={"workers": 1, "num_gpus": 1.0})
    kinds = stages.task_kinds()
    ordered = {sid: tasks[sid] for kind in kinds for sid in tasks if tasks[sid].kind == kind}
    sweep = Sweep(sweep_name, preset, spec, cells, ordered, out, store)
    compute_ranks(sweep)
    return sweep


def _ancestors(tasks: dict[str, "Stage"], sid: str) -> set[str]:
    """Every task ``sid`` depends on, directly or not."""
    out: set[str] = set()
    stack = list(tasks[sid].deps) if sid in tasks else []
    while stack:
        d = stack.pop()
        if d not in out:
            out.add(d)
            stack.extend(tasks[d].deps if d in tasks else [])
    return out


_WARNED: set[tuple[str, str]] = set()


def _no_fsdp(sweep_spec: SweepSpec, kind: str, rs: RunSpec) -> bool:
    """True (with one warning per defence) when ``kind`` of ``rs`` cannot train with FSDP."""
    reason = unsupported_reason(kind, rs)
    if reason and (kind, rs.defence.name) not in _WARNED:
        _WARNED.add((kind, rs.defence.name))
        log.warning("%s stages of %s: %s; they get one GPU each", kind,
                                                   rs.defence.name, reason)
    return reason is not None


def _draw_key(spec: RunSpec) -> str:
    """What a cell's data draw depends on: seed, disjointness and each role's dataset, size, needs."""
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
    lines = [f"sweep {sweep.name}: {len(sweep.cells)} cells (preset {sweep.preset}) -> {sweep.output}",
             f"checkpoints: {sweep.storage}",
             f"{'stage':<11} {'total':>6} {'to run':>7} {'GPU-h (to run)':>15}  resources"]
    for kind in stages.task_kinds():
        k = summary["stages"].get(kind)
        if k:
            lines.append(f"{kind:<11} {k['total']:>6} {k['to_run']:>7} {k['gpu_hours_to_run']:>15.3f}  "
                         f"{', '.join(k['resources'])}")
    lines.append(f"defence trainings {summary['defence_trainings']}, attacks {summary['attacks']}, "
                 f"evaluations {summary['evaluations']} (to run)")
    lines.append(f"expected GPU hours: {summary['gpu_hours_to_run']:.3f}")
    if "expected_makespan_s" in summary:
        lines.append(f"expected makespan on {summary['gpus']:g} GPU(s): {format_seconds(summary['expected_makespan_s'])}")
    lines.append(cost.describe(sweep.spec.gpu))
    return "\n".join(lines)


def plan_json(sweep: Sweep, todo: Optional[set[str]] = None) -> dict[str, Any]:
    return {"name": sweep.name, "preset": sweep.preset,
            "cells": [{"trial_id": c.trial_id, "labels": c.labels, "command": c.command()} for c in sweep.cells],
            "stages": [{"id": s.id, "kind": s.kind, "deps": s.deps, "cells": s.cells, "label": s.label,
                        "resources": s.resources.model_dump(), "estimate_s": round(s.estimate_s, 2),
                        "to_run": todo is None or s.id in todo} for s in sweep.stages.values()]}


