"""The stages of one trial, each written once, and ``STAGES``: their order, in one place.

    setup -> data -> base_extras -> defence -> pre_attack -> attack -> post_attack -> finish

Every way of running a trial runs these functions in this order:

* ``harness run`` (``harness.pipeline.trial.run_trial``) runs all of ``STAGES`` and writes the record;
* a sweep (``harness.sweep``) runs the work that cells share as Ray tasks of their own, one per
  ``Stage.task`` (``data``, ``base``, ``defence``, ``pre_attack``, and ``attack`` on several GPUs),
  each one ``run_stages(trial, task)``: the stages of that task and the stages they ``need``; the
  cell's own task (``cell``) is ``run_trial``, which finds the shared outputs on disk;
* the FSDP worker (``harness.sweep.fsdp``) runs the stages of its ``defence`` or ``attack`` task
  with a ``Trainer`` that shards rows and model over its ranks.

The sweep's DAG is derived from this list too (``harness.sweep.grid``: the task kinds, their
order and their dependencies come from ``task`` and ``needs``), so changing the order here changes
``harness run``, the sweep and the FSDP worker together.

Each stage reads and writes the ``Trial`` (``harness.pipeline.state``); outputs other trials can
share are cached on disk (defended checkpoint with its ``.complete`` marker, base-model extras,
pre-attack scores), and a stage whose output is there loads it instead of computing it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from harness.api.config import RunSpec
from harness.api.record import CheckpointInfo, ModelInfo, Sample, TrainStats
from harness.lib.checkpoints import is_complete, read_marker
from harness.lib.context import seed_everything
from harness.lib.memory import active_plan, plan_trial
from harness.lib.models import load_model
from harness.lib.store import atomic_write_bytes
from harness.pipeline.criteria import criteria
from harness.pipeline.evaluation import (base_extras_path, cached_json, evaluate_model, pre_attack_path,
                                         prepare_data)
from harness.pipeline.state import Trial, load_defended

log = logging.getLogger("harness.pipeline")


# ---------------------------------------------------------------------------------------------
# the stages
# ---------------------------------------------------------------------------------------------
def setup(t: Trial) -> None:
    """Seed, and describe the base model in the record (its weights load on first use)."""
    seed_everything(t.spec.seed)
    t.record.model = ModelInfo.model_validate(t.base.info())
    # the memory plan: the one the caller activated (harness run's pre-flight), else this process's view
    t.record.plan = (active_plan() or plan_trial(t.spec, device=t.device.type)).as_dict()
    if t.source.fallback:
        t.record.notes.append(f"model: {t.source.fallback}")


def data(t: Trial) -> None:
    """Complete the drawn data (answers/refusals the datasets lack, generated once and cached)."""
    t.parts, t.record.data = prepare_data(t.comp, t.source, t.base_model, t.drawn, t.progress)


def base_extras(t: Trial) -> None:
    """The extra evaluations (capability, trainability) of the undefended base model: the
    reference of the stability/trainability criteria. Cached per base model, eval settings, seed and
    eval data (``base_extras_path``)."""
    if not t.comp.extras or t.spec.defence.name == "none":
        return
    path = base_extras_path(t.comp, t.paths.checkpoints, t.base.info(), t.record.data)
    ctx = t.ctx.child("base")
    t.base_extras = cached_json(path, lambda: {n: e.evaluate_on(*t.base_model(), t.parts["eval"], ctx)
                                                for n, e in t.comp.extras.items()})
    t.record.scores.base = t.base_extras
    t.outputs["base_extras"] = path


def defence(t: Trial) -> None:
    """Apply the defence and save its checkpoint, or use the checkpoint an earlier trial (or sweep
    stage) completed: then the base model is never loaded."""
    spec, comp = t.spec, t.comp
    if spec.defence.name == "none":
        return
    key = spec.defence_key()
    folder = t.paths.checkpoints / key
    if is_complete(folder):
        log.info("defence %s: reusing checkpoint %s", spec.defence.name, folder)
        t.base.release()
        t.use_loader(lambda: load_defended(comp.defence, folder, spec.model, t.device, t.dtype))
        train, reused = read_marker(folder).get("train"), True
    else:
        model, tokenizer = t.base_model()
        t.base.release()  # trained in place: no longer the base model
        seed_everything(spec.seed)
        ctx = t.ctx.child("defence")
        rows, model = t.trainer.prepare(comp.defence, t.parts.get("defence", []), model)
        model = comp.defence.apply(model, tokenizer, rows, ctx)
        train, reused = t.trainer.stats(ctx.stats.get("train")), False
        t.trainer.save_defended(t, model, tokenizer, folder,
                                meta={"defence": spec.canonical()["defence"], "seed": spec.seed, "train": train})
        t.use(model, tokenizer)
    t.record.defence_checkpoint = CheckpointInfo(key=key, path=str(folder), reused=reused,
                                                 train=TrainStats.model_validate(train) if train else None)
    if train:
        t.record.train["defence"] = TrainStats.model_validate(train)


def pre_attack(t: Trial) -> None:
    """Score the defended model (before the attack). Cached per defended model and evaluation, so
    every attack on one defended model shares them."""
    ctx = t.ctx.child("pre_attack")
    shared = t.spec.defence.name != "none" or t.cache_pre_attack
    path = pre_attack_path(t.comp, t.paths.checkpoints, t.record.data) if shared else None

    def compute():
        model, tokenizer = t.model()
        eval_model = t.comp.defence.prepare_eval(model, tokenizer, ctx)
        return dict(zip(("scores", "rows"), evaluate_model(t.comp, eval_model, tokenizer, t.parts["eval"], ctx)))

    pre = cached_json(path, compute)
    t.record.scores.pre_attack, t.pre_rows = pre["scores"], pre["rows"]
    if path is not None:
        t.outputs["pre_attack"] = path


def attack(t: Trial) -> None:
    """Fine-tune the defended model on the attack data (or load the attacked model a separate
    sweep stage trained on several GPUs, ``Trial.attacked_from``)."""
    spec, comp = t.spec, t.comp
    ctx = t.ctx.child("attack")
    seed_everything(spec.seed)
    if t.attacked_from is not None:
        attacked, tokenizer, _ = load_model(spec.model, t.source, t.device, t.dtype, path=str(t.attacked_from))
        train = read_marker(t.attacked_from).get("train")
        t.record.notes.append(f"attack: trained by a separate stage, loaded from {t.attacked_from}")
    else:
        model, tokenizer = t.model()
        model = comp.defence.prepare_attack(model, tokenizer, ctx)
        rows, model = t.trainer.prepare(comp.attack, t.parts["attack"], model)
        attacked = comp.attack.run(model, tokenizer, rows, ctx)
        train = t.trainer.stats(ctx.stats.get("train"))
    if train:
        t.record.train["attack"] = TrainStats.model_validate(train)
    t.attacked = (attacked, tokenizer)


def post_attack(t: Trial) -> None:
    """Score the attacked model; keep the first generations of both phases in the record and all
    of them in ``samples/<trial_id>.jsonl``."""
    ctx = t.ctx.child("post_attack")
    attacked, tokenizer = t.attacked
    eval_model = t.comp.defence.prepare_eval(attacked, tokenizer, ctx)
    t.record.scores.post_attack, t.post_rows = evaluate_model(t.comp, eval_model, tokenizer, t.parts["eval"], ctx)
    k = t.spec.eval.save_generations
    t.record.samples = {"pre_attack": [Sample.model_validate(r) for r in t.pre_rows[:k]],
                        "post_attack": [Sample.model_validate(r) for r in t.post_rows[:k]]}
    samples_file = t.paths.output / "samples" / f"{t.spec.trial_id}.jsonl"
    atomic_write_bytes(samples_file, "".join(json.dumps({"phase": phase, **row}) + "\n"
                                             for phase, rows in (("pre_attack", t.pre_rows), ("post_attack", t.post_rows))
                                             for row in rows).encode())
    t.record.samples_file = str(samples_file.relative_to(t.paths.output))


def finish(t: Trial) -> None:
    """The immunization criteria from the scores; the trial is ``ok``."""
    scores = t.record.scores
    t.record.criteria = criteria(t.spec, {"pre_attack": scores.pre_attack, "post_attack": scores.post_attack},
                                 t.base_extras, t.comp.attack.evaluation)
    t.record.status = "ok"


# ---------------------------------------------------------------------------------------------
# the order
# ---------------------------------------------------------------------------------------------
def _always(spec: RunSpec) -> bool:
    return True


def _defended(spec: RunSpec) -> bool:
    return spec.defence.name != "none"


def _base_extras(spec: RunSpec) -> bool:
    return bool(spec.eval.extra) and spec.defence.name != "none"


@dataclass(frozen=True)
class Stage:
    """One step of a trial.

    ``needs``: the stages whose outputs it reads. ``task``: the sweep task (Ray stage kind) that
    computes its output for the cells that share it (``None``: every task runs it, e.g. setup).
    ``applies``: whether the stage does anything for a spec (else the sweep has no task for it).
    ``split_only_with_fsdp``: the stage is a task of its own only when it trains on several
    GPUs; otherwise it runs in the cell's task."""

    name: str
    run: Callable[[Trial], None]
    needs: tuple[str, ...] = ()
    task: Optional[str] = None
    applies: Callable[[RunSpec], bool] = _always
    split_only_with_fsdp: bool = False


STAGES: tuple[Stage, ...] = (
    Stage("setup", setup),
    Stage("data", data, needs=("setup",), task="data"),
    Stage("base_extras", base_extras, needs=("data",), task="base", applies=_base_extras),
    Stage("defence", defence, needs=("data",), task="defence", applies=_defended),
    Stage("pre_attack", pre_attack, needs=("defence",), task="pre_attack"),
    Stage("attack", attack, needs=("defence",), task="attack", split_only_with_fsdp=True),
    Stage("post_attack", post_attack, needs=("attack", "pre_attack"), task="cell"),
    Stage("finish", finish, needs=("base_extras", "pre_attack", "post_attack"), task="cell"),
)
"""The trial, in order. ``run_trial``, the sweep (its task kinds and DAG) and the FSDP worker all
read this (at call time, so a changed list changes all of them)."""


def task_kinds() -> tuple[str, ...]:
    """The sweep's task kinds in the order their work completes in the trial (by each task's last
    stage: ``data``, ``base``, ``defence``, ``pre_attack``, ``attack``, ``cell``); a task needs only
    tasks before it, since a stage needs only stages before it."""
    last = {s.task: i for i, s in enumerate(STAGES) if s.task}
    return tuple(sorted(last, key=last.__getitem__))


def closure(names: Iterable[str]) -> list[Stage]:
    """The stages ``names`` and every stage they need (transitively), in trial order."""
    by_name = {s.name: s for s in STAGES}
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in by_name:
            raise KeyError(f"no trial stage {name!r}; stages: {', '.join(by_name)}")
        seen.add(name)
        todo.extend(by_name[name].needs)
    return [s for s in STAGES if s.name in seen]


def stages_for_task(task: str) -> list[Stage]:
    """What a sweep task of kind ``task`` runs: its stages and the stages they need."""
    names = [s.name for s in STAGES if s.task == task]
    if not names:
        raise KeyError(f"no trial stage belongs to sweep task {task!r}; tasks: {', '.join(task_kinds())}")
    return closure(names)


def run_stage(t: Trial, stage: Stage) -> None:
    """Run one stage on ``t``, timed (``record.timings[<name>_s]``)."""
    t.stage = stage.name
    t.ctx.stage = stage.name
    t0 = time.perf_counter()
    stage.run(t)
    t.record.timings[f"{stage.name}_s"] = round(time.perf_counter() - t0, 2)


def run_stages(t: Trial, task: str) -> Trial:
    """Run what a sweep task of kind ``task`` runs (``stages_for_task``) on ``t``."""
    for stage in stages_for_task(task):
        run_stage(t, stage)
    return t
