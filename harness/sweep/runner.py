"""Running a sweep's stage DAG on Ray: ``harness sweep SPEC.yaml`` / ``harness sweep --preset paper``.

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
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional, TextIO

from harness.api.errors import HarnessError
from harness.lib.store import atomic_write_json
from harness.sweep.grid import SWEEP_DIR, Stage, Sweep, attacked_folder, format_seconds, marker_path

log = logging.getLogger("harness.sweep.grid")

STATE_FILE = "state.json"
PLAN_FILE = "plan.json"
LOCK_FILE = "driver.lock"


class SweepError(HarnessError):
    pass


class StageError(HarnessError):
    pass


# =============================================================================================
# worker side: the stage bodies (plain Python; no Ray needed to call them)
# =============================================================================================
def _setup(spec, output: Path, storage: Path):
    """What every model stage starts with, in the order ``run_trial`` does it."""
    from harness.lib.context import StageContext, seed_everything
    from harness.lib.models import load_model, pick_device, pick_dtype, resolve_source
    from harness.pipeline.trial import Components, TrialPaths, prepare_data

    comp = Components.build(spec)
    comp.check_ready()
    source = resolve_source(spec.model)
    device = pick_device(spec.model)
    dtype = pick_dtype(spec.model, device)
    paths = TrialPaths.of(output, storage)
    seed_everything(spec.seed)
    ctx = StageContext("setup", seed=spec.seed, device=device, dtype=dtype, workdir=paths.checkpoints, spec=spec,
                       progress=False)
    model, tokenizer, source = load_model(spec.model, source, device, dtype)
    parts, data = prepare_data(comp, model, tokenizer, source, False)
    return comp, paths, ctx, model, tokenizer, source, parts, data


def _require_checkpoint(spec, storage: Path) -> None:
    from harness.lib.checkpoints import is_complete

    if spec.defence.name != "none" and not is_complete(storage / spec.defence_key()):
        raise StageError(f"defended checkpoint {storage / spec.defence_key()} is missing or incomplete on "
                         f"{socket.gethostname()}: the defence stage has not finished, or the storage folder is not "
                         "visible to every node (use --storage on a shared file system)")


def stage_data(spec, output: Path, storage: Path, payload: dict) -> dict[str, Any]:
    """Generate (and cache) the answers/refusals every data draw of the sweep lacks, with the base
    model loaded once; the later stages then only read the cache."""
    from harness.lib import data as datamod
    from harness.api.config import validate
    from harness.lib.models import load_model, pick_device, pick_dtype, resolve_source
    from harness.pipeline.trial import Components, prepare_data

    specs = [spec] + [validate(s) for s in payload.get("more_specs") or []]
    model = tok = source = None
    completed = 0
    for s in specs:
        comp = Components.build(s)
        reqs = comp.requests()
        parts = datamod.draw(reqs, s.seed, s.disjoint)
        if not any(n for r in reqs for n in datamod.missing(parts[r.role], r.needs).values()):
            continue
        if model is None:
            device = pick_device(s.model)
            model, tok, source = load_model(s.model, resolve_source(s.model), device, pick_dtype(s.model, device))
        prepare_data(comp, model, tok, source, False)
        completed += 1
    atomic_write_json(marker_path(storage, _stage_of(payload, spec)), {"path": str(storage), "draws": len(specs),
                                                                       "completed": completed})
    return {"draws": len(specs), "completed": completed}


def stage_defence(spec, output: Path, storage: Path, payload: dict) -> dict[str, Any]:
    from harness.pipeline.trial import defend

    comp, paths, ctx, model, tok, source, parts, data = _setup(spec, output, storage)
    model, tok, ck = defend(comp, model, tok, parts.get("defence", []), ctx.child("defence"), paths)
    return {"checkpoint": ck}


def stage_base(spec, output: Path, storage: Path, payload: dict) -> dict[str, Any]:
    from harness.pipeline.trial import base_extras_path, cached_json, model_info

    comp, paths, ctx, model, tok, source, parts, data = _setup(spec, output, storage)
    path = base_extras_path(paths, model_info(source, model, ctx.dtype), spec)
    cached_json(path, lambda: {n: e.evaluate(model, tok, ctx.child("base")) for n, e in comp.extras.items()})
    atomic_write_json(marker_path(storage, _stage_of(payload, spec)), {"path": str(path)})
    return {"path": str(path)}


def stage_pre_attack(spec, output: Path, storage: Path, payload: dict) -> dict[str, Any]:
    from harness.pipeline.trial import cached_json, defend, evaluate_model, pre_attack_path

    _require_checkpoint(spec, storage)
    comp, paths, ctx, model, tok, source, parts, data = _setup(spec, output, storage)
    model, tok, ck = defend(comp, model, tok, parts.get("defence", []), ctx.child("defence"), paths)
    pre_ctx = ctx.child("pre_attack")
    eval_model = comp.defence.prepare_eval(model, tok, pre_ctx)
    path = pre_attack_path(comp, paths, data)
    pre = cached_json(path, lambda: dict(zip(("scores", "rows"), evaluate_model(
        comp, eval_model, tok, parts["eval"], pre_ctx))))
    atomic_write_json(marker_path(storage, _stage_of(payload, spec)), {"path": str(path)})
    return {"path": str(path), "scores": pre["scores"]}


def stage_cell(spec, output: Path, storage: Path, payload: dict) -> dict[str, Any]:
    from harness.pipeline.trial import run_trial

    _require_checkpoint(spec, storage)
    kwargs: dict[str, Any] = {}
    if payload.get("attacked_from"):
        kwargs["attacked_from"] = payload["attacked_from"]
    rec = run_trial(spec, output, checkpoints=storage, progress=False, raise_errors=True, cache_pre_attack=True,
                    **kwargs)
    if rec.get("status") == "oom":
        raise StageError(f"out of memory in {rec.get('error', {}).get('stage')}: "
                         f"{rec.get('error', {}).get('message', '')}")
    if payload.get("attacked_from") and rec.get("status") == "ok" and not payload.get("keep_attacked"):
        import shutil

        shutil.rmtree(payload["attacked_from"], ignore_errors=True)
    return {"record_status": rec.get("status"), "skipped": bool(rec.get("skipped"))}


def stage_attack(spec, output: Path, storage: Path, payload: dict) -> dict[str, Any]:
    """The attack alone (FSDP): train and save the attacked model for the ``cell`` stage."""
    from harness.sweep.fsdp import train_fsdp

    _require_checkpoint(spec, storage)
    folder = attacked_folder(storage, spec.trial_id)
    return train_fsdp("attack", spec, output, storage, folder, workers=payload["workers"],
                      use_gpu=payload["use_gpu"], plugins=payload.get("plugins"))


def stage_defence_fsdp(spec, output: Path, storage: Path, payload: dict) -> dict[str, Any]:
    from harness.sweep.fsdp import train_fsdp

    return train_fsdp("defence", spec, output, storage, storage / spec.defence_key(), workers=payload["workers"],
                      use_gpu=payload["use_gpu"], plugins=payload.get("plugins"))


STAGES = {"data": stage_data, "defence": stage_defence, "base": stage_base, "pre_attack": stage_pre_attack, "cell": stage_cell,
          "attack": stage_attack}


def _stage_of(payload: dict, spec) -> Stage:
    from harness.sweep.grid import Resources

    return Stage(payload["id"], payload["kind"], spec, [], [], Resources(), 0.0)


class _StageLog:
    """Route the root logger to OUTPUT/_sweep/logs/<stage>.log while a stage runs."""

    def __init__(self, log_dir: Optional[Path], stage_id: str, attempt: int):
        self.path = Path(log_dir) / (stage_id.replace(":", "-") + ".log") if log_dir else None
        self.attempt = attempt
        self.handler: Optional[logging.Handler] = None

    def __enter__(self):
        root = logging.getLogger()
        self.level = root.level
        root.setLevel(logging.INFO)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handler = logging.FileHandler(self.path, mode="a")
            self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
            try:
                from harness.api.secrets import RedactingFilter

                self.handler.addFilter(RedactingFilter())
            except ImportError:  # pragma: no cover
                pass
            root.addHandler(self.handler)
            logging.getLogger("harness.sweep.grid").info("attempt %d on %s (pid %d)", self.attempt,
                                                    socket.gethostname(), os.getpid())
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        if self.handler is not None:
            root.removeHandler(self.handler)
            self.handler.close()
        root.setLevel(self.level)
        return False


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def execute_stage(payload: dict, output: str, storage: str, plugins: list[str], log_dir: Optional[str],
                  attempt: int = 1) -> dict[str, Any]:
    """Run one stage; never raises: returns its status, timings and (on failure) the traceback."""
    started = time.time()
    out: dict[str, Any] = {"id": payload["id"], "status": "ok", "started_at": started, "attempt": attempt,
                           "host": socket.gethostname(), "pid": os.getpid(), "result": None, "error": None}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with _StageLog(Path(log_dir) if log_dir else None, payload["id"], attempt):
        try:
            from harness.api.config import validate
            from harness.api.errors import DivergedError
            from harness.sweep.grid import import_plugins

            import_plugins(plugins)
            spec = validate(payload["spec"])
            if spec.trial_id != payload["trial_id"]:
                raise StageError(f"stage {payload['id']}: the worker resolves trial id {spec.trial_id}, the driver "
                                 f"{payload['trial_id']} (different code or plugins on this node?)")
            func = STAGES[payload["kind"]]
            if payload["kind"] == "defence" and payload.get("workers", 1) > 1:
                func = stage_defence_fsdp
            try:
                with scorer_services(payload.get("scorer_services") or {}):
                    out["result"] = func(spec, Path(output), Path(storage), payload)
            except DivergedError as exc:
                out["status"] = "diverged"
                out["error"] = {"type": "DivergedError", "stage": exc.stage, "step": exc.step, "loss": str(exc.loss),
                                "message": str(exc)}
        except BaseException as exc:  # noqa: BLE001 - reported to the driver, which retries or records it
            from harness.api.secrets import redact

            oom = "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"
            out["status"] = "oom" if oom else "error"
            out["error"] = {"type": type(exc).__name__, "message": redact(str(exc))[:2000],
                            "traceback": redact(traceback.format_exc()), "stage": payload["kind"]}
            logging.getLogger("harness.sweep.grid").error("stage %s failed: %s: %s", payload["id"], type(exc).__name__,
                                                     redact(str(exc)))
        finally:
            free_memory()
    out["ended_at"] = time.time()
    out["seconds"] = round(out["ended_at"] - started, 3)
    return out


# =============================================================================================
# API scorers: one CPU-only Ray actor per scorer for the whole sweep
# =============================================================================================
API_SCORERS = ("perspective",)  # besides any metric class with ``remote = True``


def is_api_scorer(name: str) -> bool:
    from harness.api.registry import METRICS

    return name in API_SCORERS or bool(getattr(METRICS.get(name), "remote", False))


def scorer_key(name: str, params: dict[str, Any]) -> str:
    import hashlib

    blob = json.dumps({"name": name, **params}, sort_keys=True, default=str)
    return f"{name}|{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def cell_scorer(spec) -> tuple[str, dict[str, Any]]:
    """The text scorer a cell uses (as ``Components.scorer`` picks it) and its validated params."""
    from harness.api.config import scorer_config
    from harness.api.registry import ATTACKS

    key = "toxicity_scorer" if ATTACKS.get(spec.attack.name).evaluation == "toxicity" else "harm_scorer"
    scorer = getattr(spec.eval, key)
    return scorer.name, scorer_config(scorer, f"eval.{key}").model_dump(mode="json")


class ScorerService:
    """An API scorer (Perspective) shared by every stage of a sweep, as a Ray actor without GPU:
    one client-side rate limit for the whole cluster (N concurrent stages must not each send
    ``qps`` requests per second), one on-disk cache, one API client. Stages call it through a
    proxy class that replaces the scorer in the registry while the stage runs."""

    def __init__(self, name: str, params: dict[str, Any], plugins: list[str]):
        from harness.api.registry import METRICS
        from harness.sweep.grid import import_plugins

        import_plugins(plugins)
        cls = METRICS.get(name)
        self.scorer = cls(cls.Config(**params))
        self.ready = False

    def score(self, prompts: list[str], generations: list[str]):
        if not self.ready:
            self.scorer.check_ready()
            self.ready = True
        stats = getattr(self.scorer, "stats", None)
        before = dict(stats) if isinstance(stats, dict) else {}
        scores = self.scorer.score(prompts, generations)
        after = getattr(self.scorer, "stats", None)
        delta = {k: v - before.get(k, 0) for k, v in (after or {}).items() if isinstance(v, (int, float))}
        return scores, delta, os.getpid()


def _proxy_score(self, prompts, generations):
    import ray

    handle = type(self)._harness_services.get(scorer_key(self.registry_name, self.config.model_dump(mode="json")))
    if handle is None:  # a configuration the sweep did not plan for: score here
        return super(type(self), self).score(prompts, generations)
    scores, delta, pid = ray.get(handle.score.remote(list(prompts), list(generations)))
    stats = getattr(self, "stats", None)
    if isinstance(stats, dict):
        for k, v in delta.items():
            stats[k] = stats.get(k, 0) + v
    self.scored_by_pid = pid
    return scores


class scorer_services:
    """While a stage runs, the registry's API scorers score through the sweep's scorer services."""

    def __init__(self, services: dict[str, Any]):
        self.services = services
        self.swapped: dict[str, Any] = {}

    def __enter__(self):
        from harness.api.registry import METRICS

        for name in sorted({k.split("|")[0] for k in self.services}):
            real = METRICS.get(name)
            proxy = type(real.__name__, (real,), {"score": _proxy_score, "_harness_services": self.services,
                                                  "__module__": real.__module__, "__doc__": real.__doc__})
            proxy.registry_name = name
            self.swapped[name] = real
            METRICS._items[name] = proxy  # restored on exit; the registry has no public replace
        return self

    def __exit__(self, *exc):
        from harness.api.registry import METRICS

        for name, real in self.swapped.items():
            METRICS._items[name] = real
        return False


# =============================================================================================
# driver side
# =============================================================================================
def connect(address: Optional[str] = None, num_cpus: Optional[float] = None, num_gpus: Optional[float] = None,
            object_store_mb: int = 512, log_to_driver: bool = False) -> bool:
    """Join ``address`` (or ``RAY_ADDRESS``), or start Ray here. Returns True if this call started
    or joined Ray (so the caller should shut it down), False if Ray was already initialised."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=log_to_driver,
                                      object_store_memory=object_store_mb * 1024 * 1024)
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
        import fcntl

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
        import fcntl

        if self.fh:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
        return False


def error_record(spec, status: str, error: dict[str, Any]) -> dict[str, Any]:
    """A record for a cell that never ran (an upstream stage failed) or whose worker died."""
    import torch

    from harness.pipeline.trial import base_record, now

    rec = base_record(spec, torch.device("cpu"))
    rec["status"] = status
    rec["error"] = error
    rec["finished_at"] = now()
    rec["notes"].append(f"written by the sweep driver: stage {error.get('stage_id')} failed")
    return rec


class SweepRunner:
    def __init__(self, sweep: Sweep, *, retries: Optional[int] = None, progress: bool = True,
                 stream: Optional[TextIO] = None, state_interval: float = 1.0, progress_interval: Optional[float] = None,
                 isolate: Optional[str] = None, keep_attacked: bool = False):
        self.sweep = sweep
        self.retries = sweep.spec.retries if retries is None else retries
        self.isolate = isolate or sweep.spec.isolate
        self.progress = progress
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.state_interval = state_interval
        self.progress_interval = progress_interval if progress_interval is not None else (1.0 if self.tty else 10.0)
        self.keep_attacked = keep_attacked
        self.state: dict[str, Any] = {}
        self.attempts: dict[str, int] = {}
        self._last_state = 0.0
        self._last_progress = 0.0
        self._last_line = ""
        self._drawn = 0
        self._inflight: dict[Any, str] = {}
        self.capacity = (0.0, 1.0)
        self.joined = False

    # ---- state -------------------------------------------------------------------------------
    def _init_state(self, finished: set[str], todo: set[str], address: Optional[str]) -> None:
        sw = self.sweep
        stages = {}
        for st in sw.stages.values():
            stages[st.id] = {"kind": st.kind, "label": st.label, "status": "pending" if st.id in todo else "skipped",
                             "attempts": 0, "started_at": None, "ended_at": None, "seconds": None,
                             "estimate_s": round(st.estimate_s, 2), "gpus": st.resources.total_gpus,
                             "cells": len(st.cells), "host": None, "error": None}
        self.state = {"version": 1, "name": sw.name, "preset": sw.preset, "output": str(sw.output),
                      "storage": str(sw.storage), "status": "running",
                      "driver": {"pid": os.getpid(), "host": socket.gethostname(), "address": address,
                                 "started_at": time.time()},
                      "updated_at": time.time(), "cells": {"total": len(sw.cells), "finished_before": len(finished)},
                      "stages": stages, "counts": {}, "eta_s": None}

    def write_state(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_state < self.state_interval:
            return
        self._last_state = now
        self.state["updated_at"] = now
        self.state["counts"] = self.counts()
        self.state["eta_s"] = self.eta()
        self.state["elapsed_s"] = round(now - self.state["driver"]["started_at"], 1)
        atomic_write_json(self.sweep.state_dir / STATE_FILE, self.state)

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for s in self.state["stages"].values():
            k = out.setdefault(s["kind"], {"total": 0, "done": 0, "running": 0, "pending": 0, "failed": 0, "skipped": 0})
            k["total"] += 1
            status = s["status"]
            k[{"cancelled": "failed"}.get(status, status)] += 1
        return out

    def eta(self) -> Optional[float]:
        """Seconds left: remaining work (cost-model estimates rescaled per stage kind by the observed
        durations) over the cluster's GPUs (or CPUs), and at least the longest remaining chain."""
        stages = self.state["stages"]
        ratios: dict[str, list[float]] = {}
        for s in stages.values():
            if s["status"] == "done" and s["seconds"] and s["estimate_s"]:
                ratios.setdefault(s["kind"], []).append(s["seconds"] / s["estimate_s"])
        every = sorted(r for rs in ratios.values() for r in rs)
        default = every[len(every) // 2] if every else 1.0

        def calib(kind: str) -> float:
            rs = sorted(ratios.get(kind, []))
            return rs[len(rs) // 2] if rs else default

        now = time.time()
        left: dict[str, float] = {}
        gpu_work = cpu_work = 0.0
        for sid, s in stages.items():
            if s["status"] in ("pending", "running"):
                d = s["estimate_s"] * calib(s["kind"])
                if s["status"] == "running" and s["started_at"]:
                    d = max(d - (now - s["started_at"]), 0.05 * d)
                left[sid] = d
                if s["gpus"]:
                    gpu_work += d * s["gpus"]
                else:
                    cpu_work += d
        if not left:
            return 0.0
        # longest remaining chain
        chain: dict[str, float] = {}
        children = self.sweep.children()
        for sid in reversed(list(self.sweep.stages)):
            if sid in left:
                chain[sid] = left[sid] + max((chain.get(c, 0.0) for c in children[sid]), default=0.0)
        cap_g, cap_c = max(self.capacity[0], 1e-9), max(self.capacity[1], 1.0)
        return round(max(gpu_work / cap_g if gpu_work else 0.0, cpu_work / cap_c, max(chain.values())), 1)

    def progress_line(self) -> str:
        parts = []
        for kind, k in self.counts().items():
            active = k["total"] - k["skipped"]
            bit = f"{kind} {k['done']}/{active} done"
            if k["running"]:
                bit += f", {k['running']} running"
            if k["pending"]:
                bit += f", {k['pending']} pending"
            if k["failed"]:
                bit += f", {k['failed']} failed"
            parts.append(bit)
        elapsed = time.time() - self.state["driver"]["started_at"]
        return (f"[sweep {self.sweep.name}] " + " | ".join(parts) +
                f" | {format_seconds(elapsed)} elapsed, ~{format_seconds(self.eta())} left")

    def progress_block(self) -> list[str]:
        """The live display on a terminal: one line per stage kind, then elapsed and time left."""
        lines = []
        for kind, k in self.counts().items():
            lines.append(f"  {kind:<11} {k['done']:>4}/{k['total'] - k['skipped']:<4} done {k['running']:>3} running "
                         f"{k['pending']:>4} pending {k['failed']:>3} failed")
        elapsed = time.time() - self.state["driver"]["started_at"]
        lines.append(f"[sweep {self.sweep.name}] {format_seconds(elapsed)} elapsed, ~{format_seconds(self.eta())} left")
        return lines

    def show_progress(self, force: bool = False) -> None:
        if not self.progress:
            return
        now = time.time()
        if not force and now - self._last_progress < self.progress_interval:
            return
        if self.tty:
            block = self.progress_block()
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            self.stream.write(up + "".join("\x1b[2K" + line + "\n" for line in block))
            self._drawn = len(block)
            self._last_progress = now
            self.stream.flush()
            return
        line = self.progress_line()
        if not force and line.split(" | ")[:-1] == self._last_line.split(" | ")[:-1]:
            return  # nothing changed but the clock
        self._last_progress = now
        self._last_line = line
        self.stream.write(line + "\n")
        self.stream.flush()

    # ---- run -----------------------------------------------------------------------------
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

    def _fail_downstream(self, st: Stage, status: str, error: dict[str, Any], remaining: set[str]) -> None:
        from harness.lib.store import ResultStore

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
            if st.kind == "cell" and existing and existing.get("status") in ("error", "oom", "diverged") \
                    and existing.get("error"):
                existing["error"]["attempts"] = error.get("attempts")
                existing["error"]["stage_id"] = st.id
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
        from harness.lib.store import ResultStore

        store = ResultStore(self.sweep.output)
        statuses: dict[str, int] = {}
        for c in self.sweep.cells:
            rec = store.load(c.trial_id)
            key = rec.get("status") if rec else "missing"
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
    from harness.sweep.grid import plan_json

    return plan_json(sweep, todo)


# =============================================================================================
# CLI
# =============================================================================================
def build_from_args(args):
    from harness.sweep.grid import build, load_sweep_spec

    spec, preset, _ = load_sweep_spec(args.spec, args.preset)
    changes = {}
    if args.retries is not None:
        changes["retries"] = args.retries
    if args.gpu:
        changes["gpu"] = args.gpu
    if args.isolate:
        changes["isolate"] = args.isolate
    if changes:
        from harness.sweep.grid import copy_spec

        spec = copy_spec(spec, **changes)
    return build(spec, preset, output=args.output, storage=args.storage, models=args.model or None,
                 extra_sets=args.sets)


def cmd_sweep(args) -> int:
    from harness.sweep.grid import format_plan

    sweep = build_from_args(args)
    if args.dry_run:
        _, todo = sweep.scan()
        gpus = args.num_gpus
        if gpus is None:
            try:
                import torch

                gpus = float(torch.cuda.device_count()) or 1.0
            except ImportError:  # pragma: no cover
                gpus = 1.0
        summary = sweep.summary(todo, gpus=gpus, cpus=args.num_cpus or 1e9)
        if args.json:
            print(json.dumps({**summary, "plan": _plan(sweep, todo)}, indent=2, default=str))
        else:
            print(format_plan(sweep, summary))
            if args.verbose_plan:
                for st in sweep.stages.values():
                    mark = "run " if st.id in todo else "done"
                    print(f"  [{mark}] {st.kind:<10} {st.label:<50} {st.resources.total_gpus:>5g} GPU "
                          f"{format_seconds(st.estimate_s):>9}  after: {', '.join(st.deps) or '-'}")
        return 0
    runner = SweepRunner(sweep, progress=not args.no_progress)
    summary = runner.run(address=args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                         log_to_driver=args.worker_logs)
    print(json.dumps(summary, indent=2))
    bad = sum(v for k, v in summary["records"].items() if k not in ("ok", "diverged"))
    return 0 if bad == 0 else 1


def register(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of cells as a DAG of Ray tasks (resumable)",
                       description="Expand a sweep file (or a preset's sweep: section) into cells and run its stages "
                                   "(defence once per defended model, pre-attack scores once per defended model, "
                                   "attack + scores per cell) on Ray. Re-running resumes.")
    p.add_argument("spec", nargs="?", help="sweep YAML file (or a preset file with a sweep: section)")
    p.add_argument("--preset", help="run this preset's sweep: section (or: the base preset of SPEC)")
    p.add_argument("--model", action="append", help="replace the models axis (repeatable)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every cell, after the sweep's own set: (repeatable)")
    p.add_argument("--output", help="results folder (default: the sweep's output, else results/<name>)")
    p.add_argument("--storage", help="defended-checkpoint folder; a path every node sees (default OUTPUT/checkpoints)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start Ray locally)")
    p.add_argument("--num-gpus", type=float, help="GPUs of a local Ray (fake ones on CPU for tests); for --dry-run: "
                                                  "the GPUs to estimate the makespan for")
    p.add_argument("--num-cpus", type=float, help="CPUs of a local Ray")
    p.add_argument("--retries", type=int, help="extra attempts of a failed stage (default: the sweep's, 2)")
    p.add_argument("--gpu", help="cost-model GPU profile (h100, a100-80, ...)")
    p.add_argument("--isolate", choices=["process", "reuse"],
                   help="process (default): a fresh worker per stage, so GPU memory goes back; reuse: warm workers")
    p.add_argument("--dry-run", action="store_true", help="print the DAG, its GPU hours and expected makespan; run nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: machine-readable plan")
    p.add_argument("--verbose-plan", action="store_true", help="with --dry-run: list every stage")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")
    p.add_argument("--worker-logs", action="store_true", help="also stream the workers' logs to this terminal")
    p.set_defaults(func=cmd_sweep)
