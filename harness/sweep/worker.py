"""What one Ray task of a sweep runs (called by ``harness.sweep.execute.execute_stage``).

Each task kind is a thin adapter over the trial's stages (``harness.pipeline.stages``): it opens
the cell's trial and runs ``run_stages(trial, kind)`` (the stages of that kind and what they
need, loading whatever an earlier task left on disk), then notes where its output went; the
``cell`` task is ``run_trial`` itself, which writes the record. Plain Python: no Ray needed to call
these functions (the tests call them directly).

The ``defence`` task trains under the defence key's lock (``<storage>/.locks/<key>.lock``,
``harness.lib.checkpoints.checkpoint_lock``), the lock ``harness run`` takes in its defence stage:
a sweep and a ``harness run`` (or two sweeps) sharing a checkpoint folder never train the same
defended checkpoint at once; the later one waits, then reuses the checkpoint (docs/reliability.md,
"Two runs at once").
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
from pathlib import Path
from typing import Any, Optional

from harness.api.config import RunSpec, validate
from harness.api.errors import HarnessError
from harness.lib.checkpoints import checkpoint_lock, is_complete
from harness.lib.locks import describe_owner, new_owner
from harness.lib.store import atomic_write_json
from harness.pipeline.stages import run_stage, run_stages, stages_for_task
from harness.pipeline.state import BaseModel, Trial, TrialPaths, open_trial
from harness.pipeline.trial import run_trial
from harness.sweep.dag import attacked_folder, stage_marker
from harness.sweep.fsdp import train_fsdp

log = logging.getLogger("harness.sweep.worker")


class StageError(HarnessError):
    """A task cannot do its work on this node (its input is missing, or it ran out of memory)."""


def _open(spec: RunSpec, output: Path, storage: Path, **kwargs: Any) -> Trial:
    return open_trial(spec, TrialPaths.of(output, storage), progress=False, **kwargs)


def _note_output(payload: dict, spec: RunSpec, storage: Path, info: dict[str, Any]) -> None:
    """The marker that tells a later scan this task's output exists (its file's name holds keys the
    driver cannot compute without reading data)."""
    atomic_write_json(stage_marker(storage, payload["kind"], payload["id"], spec), info)


def _require_checkpoint(spec: RunSpec, storage: Path) -> None:
    if spec.defence.name != "none" and not is_complete(storage / spec.defence_key()):
        raise StageError(f"defended checkpoint {storage / spec.defence_key()} is missing or incomplete on "
                         f"{socket.gethostname()}: the defence stage has not finished, or the storage folder is not "
                         "visible to every node (use --storage on a shared file system)")


def stage_data(spec: RunSpec, output: Path, storage: Path, payload: dict) -> dict[str, Any]:
    """Generate (and cache) the answers/refusals every data draw of the sweep lacks, with the base
    model loaded once for all of them; the later tasks then only read the cache."""
    specs = [spec] + [validate(s) for s in payload.get("more_specs") or []]
    base: Optional[BaseModel] = None
    completed = 0
    for s in specs:
        t = _open(s, output, storage, base=base)
        base = t.base  # shared: the same base model (and synth settings) for every draw of this task
        run_stages(t, "data")
        completed += bool(t.record.data["synthesized"])
    _note_output(payload, spec, storage, {"path": str(storage), "draws": len(specs), "completed": completed})
    return {"draws": len(specs), "completed": completed}


def stage_base(spec: RunSpec, output: Path, storage: Path, payload: dict) -> dict[str, Any]:
    t = run_stages(_open(spec, output, storage), "base")
    path = t.outputs["base_extras"]
    _note_output(payload, spec, storage, {"path": str(path)})
    return {"path": str(path)}


def _defence_lock(spec: RunSpec, storage: Path, payload: dict):
    """The defence key's lock (see the module docstring), or nothing for the base model."""
    if spec.defence.name == "none":
        return contextlib.nullcontext()
    key = spec.defence_key()
    owner = {**new_owner(), "trial_id": spec.trial_id, "sweep_task": payload.get("id")}

    def on_wait(holder: dict) -> None:
        log.warning("defence checkpoint %s is being trained by %s (trial %s): waiting for it, then reusing it", key,
                    describe_owner(holder), holder.get("trial_id", "?"))

    return checkpoint_lock(storage / key, owner, on_wait, what=f"defence {key}")


def stage_defence(spec: RunSpec, output: Path, storage: Path, payload: dict) -> dict[str, Any]:
    if payload.get("workers", 1) > 1:
        with _defence_lock(spec, storage, payload):
            return train_fsdp("defence", spec, output, storage, storage / spec.defence_key(),
                              workers=payload["workers"], use_gpu=payload["use_gpu"], plugins=payload.get("plugins"))
    t = _open(spec, output, storage)
    for stage in stages_for_task("defence"):  # what run_stages(t, "defence") runs, the defence stage locked
        with _defence_lock(spec, storage, payload) if stage.name == "defence" else contextlib.nullcontext() as lock:
            if lock is not None and lock.waited_for is not None:
                log.warning("defence checkpoint %s: waited %.0fs for %s; %s", spec.defence_key(), lock.waited_s,
                            describe_owner(lock.waited_for), "reusing it" if is_complete(storage / spec.defence_key())
                            else "it did not finish, training it here")
            run_stage(t, stage)
    return {"checkpoint": t.record.defence_checkpoint.model_dump(mode="json")}


def stage_pre_attack(spec: RunSpec, output: Path, storage: Path, payload: dict) -> dict[str, Any]:
    _require_checkpoint(spec, storage)
    t = run_stages(_open(spec, output, storage, cache_pre_attack=True), "pre_attack")
    path = t.outputs["pre_attack"]
    _note_output(payload, spec, storage, {"path": str(path)})
    return {"path": str(path), "scores": t.record.scores.pre_attack}


def stage_attack(spec: RunSpec, output: Path, storage: Path, payload: dict) -> dict[str, Any]:
    """The attack alone, on several GPUs (FSDP): train and save the attacked model for the cell."""
    _require_checkpoint(spec, storage)
    return train_fsdp("attack", spec, output, storage, attacked_folder(storage, spec.trial_id),
                      workers=payload["workers"], use_gpu=payload["use_gpu"], plugins=payload.get("plugins"))


def stage_cell(spec: RunSpec, output: Path, storage: Path, payload: dict) -> dict[str, Any]:
    """The whole trial (``run_trial``): the shared outputs are on disk, the rest runs here."""
    _require_checkpoint(spec, storage)
    attacked = payload.get("attacked_from")
    rec = run_trial(spec, output, checkpoints=storage, progress=False, raise_errors=True, cache_pre_attack=True,
                    attacked_from=attacked or None)
    if rec.status == "oom":
        raise StageError(f"out of memory in {rec.error.stage}: {rec.error.message}")
    if attacked and rec.status == "ok" and not payload.get("keep_attacked"):
        shutil.rmtree(attacked, ignore_errors=True)
    return {"record_status": rec.status, "skipped": rec.skipped}


TASKS = {"data": stage_data, "base": stage_base, "defence": stage_defence, "pre_attack": stage_pre_attack,
         "attack": stage_attack, "cell": stage_cell}
"""Task kind -> its adapter; the kinds are ``harness.pipeline.stages.task_kinds()``."""
