"""The sweep driver: runs a sweep's task DAG (``harness.sweep.dag``) on Ray.

Each stage (``harness.sweep.grid``) is one Ray task that asks for the resources the sweep declares
(``num_gpus`` may be fractional; 0 for CPU-only stages), or, for an FSDP stage (``workers`` > 1),
a task without resources that runs a Ray Train job of that many workers (``harness.sweep.fsdp``).
Without ``--address`` (or ``RAY_ADDRESS``) Ray starts on this machine; with it, the driver joins
that cluster (the storage folder must then be visible to every node).

* GPU memory: every stage runs in a fresh worker process (``max_calls=1``, ``isolate: process``),
  and calls ``gc.collect()`` + ``torch.cuda.empty_cache()`` when it ends (``isolate: reuse`` keeps
  the worker and relies on that alone).
* Order: stages whose inputs are ready are submitted highest critical path first, only as many as
  the cluster's free GPUs and CPUs hold, so the order is ours, not Ray's queue's.
* Failures: a stage that raises (or whose worker dies) is retried ``retries`` times; then every
  cell that needs it gets a record with status ``error`` (``oom``, ``diverged``) and the traceback,
  and the rest of the sweep goes on. A diverged defence is not retried (it is deterministic).
* Resume: a stage runs only if an unfinished cell needs it and its output is not on disk (records
  by trial id, checkpoints with their ``.complete`` marker, pre-attack score files); every file is
  written atomically, so a driver killed at any point leaves nothing a later run would trust.
* API scorers (Perspective, or a metric with ``remote = True``): one CPU-only Ray actor per scorer
  and configuration scores for every stage of the sweep, so the whole cluster keeps one client-side
  rate limit and one cache (the calling stage waits for its scores; see ``ScorerService``).
* Progress: a live line per stage kind (done / running / pending / failed, time left) on stderr,
  and ``OUTPUT/_sweep/state.json`` (atomic, at most once a second) for ``harness status OUTPUT``.
  Each stage's log goes to ``OUTPUT/_sweep/logs/<stage>.log``.

Modules: ``dag`` (the tasks, from the trial's stage list), ``execute`` (the Ray task) and ``worker``
(what it runs: thin adapters over ``harness.pipeline.stages``), ``services`` (the API scorer actor), ``progress``
(state file and live display), ``fsdp`` (multi-GPU training); ``harness sweep`` is
``harness.cli.sweep``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional, TextIO

import torch

from harness.api.errors import HarnessError
from harness.api.record import ErrorInfo, TrialRecord
from harness.api.registry import ATTACKS
from harness.lib.retention import prune
from harness.lib.store import ResultStore, atomic_write_json
from harness.pipeline.state import new_record, now
from harness.sweep.dag import Stage, Sweep, attacked_folder, plan_json
from harness.sweep.progress import STATE_FILE, SweepProgress  # noqa: F401 - STATE_FILE: re-exported
from harness.sweep.services import ScorerService, cell_scorer, is_api_scorer, scorer_key
from harness.sweep.execute import execute_stage, hub_env

log = logging.getLogger("harness.sweep.runner")

PLAN_FILE = "plan.json"
LOCK_FILE = "driver.lock"


class SweepError(HarnessError):
    pass


def connect(address: Optional[str] = None, num_cpus: Optional[float] = None, num_gpus: Optional[float] = None,
            object_store_mb: int = 512, log_to_driver: bool = False) -> bool:
    """Join ``address`` (or ``RAY_ADDRESS``), or start Ray here. Returns True if this call started
    or joined Ray (so the caller should shut it down), False if Ray was already initialised."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    # HF_TOKEN, the hub caches and offline switches reach every worker (and Ray Train rank) of the
    # job, on this machine or a joined cluster; the values are never logged
    runtime_env = {"env_vars": hub_env()}
    if address:
        log.info("joining the Ray cluster at %s (forwarding %s)", address, ", ".join(runtime_env["env_vars"]) or "no env")
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env=runtime_env)
    else:
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=log_to_driver,
                                      object_store_memory=object_store_mb * 1024 * 1024, runtime_env=runtime_env)
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if num_gpus is not None:
            kwargs["num_gpus"] = num_gpus
        ray.init(**kwargs)
        log.info("started a local Ray instance: %s", ray.cluster_resources())
    return True


class DriverLock:
    """One driver per results folder (an advisory lock the OS drops when the process dies)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.fh = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.seek(0)
            holder = self.fh.read().strip()
            self.fh.close()
            raise SweepError(f"another sweep driver is running on {self.path.parent.parent} ({holder or 'unknown'}); "
                             "wait for it or watch it with `harness status`") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.fh.flush()
        return self

    def __exit__(self, *exc):
        if self.fh:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
        return False


def error_record(spec, status: str, error: dict[str, Any]) -> TrialRecord:
    """A record for a cell that never ran (an upstream stage failed) or whose worker died."""
    rec = new_record(spec, ATTACKS.get(spec.attack.name).evaluation, torch.device("cpu"))
    rec.status = status
    rec.error = ErrorInfo.model_validate(error)
    rec.finished_at = now()
    rec.notes.append(f"written by the sweep driver: stage {error.get('stage_id')} failed")
    return rec


class SweepRunner(SweepProgress):
    """Runs the tasks of a sweep on Ray: ready tasks by priority, as many as the cluster holds;
    failures retried, then recorded for every cell that needed them."""

    def __init__(self, sweep: Sweep, *, retries: Optional[int] = None, progress: bool = True,
                 stream: Optional[TextIO] = None, state_interval: float = 1.0, progress_interval: Optional[float] = None,
                 isolate: Optional[str] = None, keep_attacked: bool = False, keep_checkpoints: str = "all"):
        self.sweep = sweep
        self.retries = sweep.spec.retries if retries is None else retries
        self.isolate = isolate or sweep.spec.isolate
        self.progress = progress
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.state_interval = state_interval
        self.progress_interval = progress_interval if progress_interval is not None else (1.0 if self.tty else 10.0)
        self.keep_attacked = keep_attacked
        self.keep_checkpoints = keep_checkpoints  # harness.lib.retention policy for defended checkpoints
        self._retired: list[Path] = []  # defended checkpoints no later stage of this sweep needs
        self._init_progress()
        self.attempts: dict[str, int] = {}
        self._inflight: dict[Any, str] = {}
        self.capacity = (0.0, 1.0)
        self.joined = False

    def run(self, *, address: Optional[str] = None, num_cpus: Optional[float] = None,
            num_gpus: Optional[float] = None, log_to_driver: bool = False) -> dict[str, Any]:
        sw = self.sweep
        with DriverLock(sw.state_dir):
            finished, todo = sw.scan()
            atomic_write_json(sw.state_dir / PLAN_FILE, _plan(sw, todo))
            self._init_state(finished, todo, address or os.environ.get("RAY_ADDRESS"))
            self.capacity = (0.0, 1.0)
            if not todo:
                self.state["status"] = "finished"
                self.write_state(force=True)
                log.info("sweep %s: all %d cells already finished", sw.name, len(sw.cells))
                return self.summary()
            started_ray = connect(address, num_cpus, num_gpus, log_to_driver=log_to_driver)
            self.joined = bool(address or os.environ.get("RAY_ADDRESS"))
            try:
                self._loop(todo)
            except KeyboardInterrupt:
                self.state["status"] = "interrupted"
                self._cancel_all()
                raise
            finally:
                if started_ray:
                    import ray

                    ray.shutdown()
            self.state["status"] = "finished" if not any(
                s["status"] in ("failed", "cancelled") for s in self.state["stages"].values()) else "finished_with_errors"
            self.write_state(force=True)
            self.show_progress(force=True)
            return self.summary()

    def _cluster_capacity(self) -> tuple[float, float]:
        import ray

        res = ray.cluster_resources()
        return float(res.get("GPU", 0.0)), float(res.get("CPU", 0.0))

    def _submit(self, stage: Stage):
        import ray

        sw = self.sweep
        attempt = self.attempts.get(stage.id, 0) + 1
        self.attempts[stage.id] = attempt
        payload = stage.payload()
        payload["plugins"] = list(sw.spec.plugins)
        payload["scorer_services"] = self._services_for(stage)
        if stage.kind == "cell" and any(sw.stages[d].kind == "attack" for d in stage.deps):
            payload["attacked_from"] = str(attacked_folder(sw.storage, stage.spec.trial_id))
            payload["keep_attacked"] = self.keep_attacked
        r = stage.resources
        fsdp = r.workers > 1 and stage.kind in ("defence", "attack")
        opts: dict[str, Any] = {"name": f"{stage.kind}:{stage.label}"[:100], "max_retries": 0}
        if fsdp:  # the Ray Train job asks for the workers' resources itself
            opts.update(num_cpus=0, num_gpus=0)
        else:
            opts.update(num_cpus=r.num_cpus, num_gpus=r.num_gpus)
            if r.memory_gb:
                opts["memory"] = int(r.memory_gb * 1024 ** 3)
        ref = _remote(self.isolate == "process").options(**opts).remote(payload, str(sw.output), str(sw.storage), list(sw.spec.plugins),
                                               str(sw.state_dir / "logs"), attempt)
        s = self.state["stages"][stage.id]
        s.update(status="running", attempts=attempt, started_at=time.time(), ended_at=None, error=None)
        return ref

    def _start_services(self, todo: set[str]) -> None:
        """One CPU-only actor per API scorer (and configuration) that a stage to run will call."""
        import ray

        self.services: dict[str, Any] = {}
        if not self.sweep.spec.scorer_service:
            return
        for sid in todo:
            st = self.sweep.stages[sid]
            if st.kind not in ("pre_attack", "cell"):
                continue
            name, params = cell_scorer(st.spec)
            key = scorer_key(name, params)
            if key in self.services or not is_api_scorer(name):
                continue
            actor = ray.remote(num_cpus=0, num_gpus=0, max_concurrency=1)(ScorerService)
            self.services[key] = actor.options(name=f"scorer-{key}-{os.getpid()}"[:120]).remote(
                name, params, list(self.sweep.spec.plugins))
            log.info("API scorer %s: one CPU-only Ray actor scores for every stage (one rate limit)", key)

    def _services_for(self, stage: Stage) -> dict[str, Any]:
        if stage.kind not in ("pre_attack", "cell") or not getattr(self, "services", None):
            return {}
        key = scorer_key(*cell_scorer(stage.spec))
        return {key: self.services[key]} if key in self.services else {}

    def _loop(self, todo: set[str]) -> None:
        import ray

        self._start_services(todo)

        sw = self.sweep
        remaining = set(todo)
        done: set[str] = set()
        inflight: dict[Any, str] = {}
        self._inflight = inflight
        used = [0.0, 0.0]
        self.capacity = self._cluster_capacity()
        last_cap = time.time()
        if self.capacity[0] == 0 and not self.joined and any(sw.stages[s].resources.num_gpus for s in remaining):
            log.warning("this machine has no GPU (and no --num-gpus): every stage runs on the CPU")
            for sid in remaining:
                st = sw.stages[sid]
                st.resources = st.resources.model_copy(update={"num_gpus": 0.0})
                self.state["stages"][sid]["gpus"] = 0.0
        warned: set[str] = set()
        self.write_state(force=True)
        self.show_progress(force=True)
        while remaining or inflight:
            if time.time() - last_cap > 10:
                self.capacity, last_cap = self._cluster_capacity(), time.time()
            running_ids = set(inflight.values())
            ready = [sw.stages[sid] for sid in remaining
                     if sid not in running_ids and all(d in done or d not in todo for d in sw.stages[sid].deps)]
            ready.sort(key=lambda st: (-st.rank, st.id))
            for st in ready:
                r = st.resources
                fits = (used[0] + r.total_gpus <= self.capacity[0] + 1e-9 and
                        used[1] + r.total_cpus <= self.capacity[1] + 1e-9)
                if not fits and inflight:
                    continue
                if not fits and st.id not in warned:
                    warned.add(st.id)
                    log.warning("stage %s asks for %g GPU / %g CPU but the cluster has %g / %g: submitted anyway "
                                "(an autoscaler may add nodes)", st.id, r.total_gpus, r.total_cpus, *self.capacity)
                ref = self._submit(st)
                inflight[ref] = st.id
                used[0] += r.total_gpus
                used[1] += r.total_cpus
            self.write_state()
            self.show_progress()
            if not inflight:
                break
            ready_refs, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            for ref in ready_refs:
                sid = inflight.pop(ref)
                st = sw.stages[sid]
                used[0] -= st.resources.total_gpus
                used[1] -= st.resources.total_cpus
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the worker died (OOM kill, segfault, node lost)
                    result = {"id": sid, "status": "error", "started_at": self.state["stages"][sid]["started_at"],
                              "ended_at": time.time(), "host": None,
                              "error": {"type": type(exc).__name__, "message": str(exc)[:2000],
                                        "traceback": "".join(traceback.format_exception(exc))[-20000:],
                                        "stage": st.kind}}
                self._handle(st, result, remaining, done)
        self.write_state(force=True)

    def _handle(self, st: Stage, result: dict[str, Any], remaining: set[str], done: set[str]) -> None:
        s = self.state["stages"][st.id]
        s.update(started_at=result.get("started_at") or s["started_at"], ended_at=result.get("ended_at"),
                 host=result.get("host"))
        if s["started_at"] and s["ended_at"]:
            s["seconds"] = round(s["ended_at"] - s["started_at"], 3)
        s.setdefault("history", []).append({k: result.get(k) for k in ("attempt", "status", "started_at", "ended_at",
                                                                          "host", "pid")})
        status = result["status"]
        if status == "ok":
            s["status"] = "done"
            remaining.discard(st.id)
            done.add(st.id)
            self._retain(st, done)
            return
        err = result.get("error") or {}
        s["error"] = f"{err.get('type')}: {str(err.get('message', '')).splitlines()[0][:300] if err.get('message') else ''}"
        retriable = status != "diverged"
        if retriable and self.attempts[st.id] <= self.retries:
            log.warning("stage %s failed (attempt %d of %d): %s; retrying", st.id, self.attempts[st.id],
                        self.retries + 1, s["error"])
            s["status"] = "pending"
            return
        log.error("stage %s failed after %d attempt(s): %s", st.id, self.attempts[st.id], s["error"])
        s["status"] = "failed"
        remaining.discard(st.id)
        self._fail_downstream(st, status, {**err, "stage_id": st.id, "attempts": self.attempts[st.id]}, remaining)

    def _retain(self, st: Stage, done: set[str]) -> None:
        """``--keep-checkpoints``: once every stage after a defence is done, its checkpoint is no
        longer needed by this sweep; ``none`` removes it, ``last`` keeps only the latest such."""
        if self.keep_checkpoints == "all" or st.kind == "defence":
            return
        sw = self.sweep
        parents = {sid: [p for p in sw.stages[sid].deps] for sid in sw.stages}
        stack, ancestors = list(parents[st.id]), set()
        while stack:
            sid = stack.pop()
            if sid not in ancestors:
                ancestors.add(sid)
                stack.extend(parents[sid])
        children = sw.children()
        for sid in ancestors:
            d = sw.stages[sid]
            if d.kind != "defence":
                continue
            below, stack = set(), list(children[sid])
            while stack:
                cid = stack.pop()
                if cid not in below:
                    below.add(cid)
                    stack.extend(children[cid])
            folder = sw.storage / d.spec.defence_key()
            if below <= done and folder not in self._retired:
                self._retired.append(folder)
                # last: the previous finished checkpoints go, this one stays until the next finishes;
                # a checkpoint that later cells still need is never touched
                gone = self._retired if self.keep_checkpoints == "none" else self._retired[:-1]
                prune(sw.storage, "none", [f for f in gone if f.exists()])

    def _fail_downstream(self, st: Stage, status: str, error: dict[str, Any], remaining: set[str]) -> None:
        sw = self.sweep
        children = sw.children()
        stack, seen = list(children[st.id]), set()
        while stack:
            cid = stack.pop()
            if cid in seen:
                continue
            seen.add(cid)
            if cid in remaining:
                remaining.discard(cid)
                self.state["stages"][cid].update(status="cancelled", error=f"upstream {st.id} failed")
            stack.extend(children[cid])
        store = ResultStore(sw.output)
        rec_status = {"diverged": "diverged", "oom": "oom"}.get(status, "error")
        for tid in st.cells:
            if store.is_finished(tid):
                continue
            existing = store.load(tid)
            if st.kind == "cell" and existing and existing.status in ("error", "oom", "diverged") and existing.error:
                existing.error.attempts = error.get("attempts")  # the cell wrote its own error record
                existing.error.stage_id = st.id
                store.write(existing)
                continue
            err = {"type": error.get("type"), "stage": error.get("stage", st.kind), "message": error.get("message"),
                   "traceback": error.get("traceback"), "stage_id": st.id, "attempts": error.get("attempts")}
            for key in ("step", "loss"):
                if key in error:
                    err[key] = error[key]
            store.write(error_record(sw.cell(tid).spec, rec_status, err))

    def _cancel_all(self) -> None:
        """Ctrl-C: cancel the running stages (their partial outputs are never trusted: see resume)."""
        import ray

        for ref in list(self._inflight):
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass
        for s in self.state.get("stages", {}).values():
            if s["status"] == "running":
                s["status"] = "pending"
        self.write_state(force=True)

    def summary(self) -> dict[str, Any]:
        store = ResultStore(self.sweep.output)
        statuses: dict[str, int] = {}
        for c in self.sweep.cells:
            rec = store.load(c.trial_id)
            key = rec.status if rec else "missing"
            statuses[key] = statuses.get(key, 0) + 1
        ran = {}
        for s in self.state.get("stages", {}).values():
            if s["status"] == "done":
                ran[s["kind"]] = ran.get(s["kind"], 0) + 1
        return {"name": self.sweep.name, "output": str(self.sweep.output), "cells": len(self.sweep.cells),
                "records": statuses, "stages_run": ran, "status": self.state.get("status"),
                "elapsed_s": self.state.get("elapsed_s")}


_REMOTE: dict[bool, Any] = {}


def _remote(isolate: bool):
    """``execute_stage`` as a Ray task; ``isolate``: one call per worker process (``max_calls=1``),
    so every stage's GPU memory goes back with its process; else workers are reused (``max_calls=0``,
    unlimited) and ``free_memory`` alone releases the cached blocks."""
    if isolate not in _REMOTE:
        import ray

        _REMOTE[isolate] = ray.remote(max_calls=1 if isolate else 0)(execute_stage)
    return _REMOTE[isolate]


def _plan(sweep: Sweep, todo: set[str]) -> dict[str, Any]:
    return plan_json(sweep, todo)
