"""Running one task of a sweep in a Ray worker: ``execute_stage`` (the remote function).

This module is what a Ray worker imports to call the task, so it stays light: the trial code
(torch, transformers) is imported inside ``execute_stage``, inside the task's own time and log,
and a task's start time is when the worker began it, imports included.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from harness.api.config import validate
from harness.api.errors import DivergedError, HarnessError
from harness.api.secrets import RedactingFilter, redact
from harness.sweep.grid import import_plugins
from harness.sweep.services import scorer_services

log = logging.getLogger("harness.sweep.worker")

#: what a Ray worker (task, Ray Train rank) must see to reach the hubs as the driver does: the
#: token for gated models (Llama-2), the caches and the offline switches. Forwarded through the
#: Ray job's ``runtime_env`` (``hub_env``), never logged and never written to a record.
FORWARDED_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE",
                 "TRANSFORMERS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "HF_ENDPOINT", "HARNESS_CACHE")


def hub_env(environ: Optional[dict] = None) -> dict[str, str]:
    """The variables of ``FORWARDED_ENV`` set in ``environ`` (default: this process's)."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in FORWARDED_ENV if environ.get(k)}


class TrialIdMismatch(HarnessError):
    """The worker resolves a different trial id than the driver (other code or plugins on the node)."""


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
            self.handler.addFilter(RedactingFilter())
            root.addHandler(self.handler)
            log.info("attempt %d on %s (pid %d)", self.attempt, socket.gethostname(), os.getpid())
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
    torch = sys.modules.get("torch")  # only if the task loaded it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def execute_stage(payload: dict, output: str, storage: str, plugins: list[str], log_dir: Optional[str],
                  attempt: int = 1) -> dict[str, Any]:
    """Run one task; never raises: returns its status, timings and (on failure) the traceback."""
    started = time.time()
    out: dict[str, Any] = {"id": payload["id"], "status": "ok", "started_at": started, "attempt": attempt,
                           "host": socket.gethostname(), "pid": os.getpid(), "result": None, "error": None}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with _StageLog(Path(log_dir) if log_dir else None, payload["id"], attempt):
        try:
            from harness.sweep.worker import TASKS  # torch, transformers: timed and logged as the task's

            import_plugins(plugins)
            spec = validate(payload["spec"])
            if spec.trial_id != payload["trial_id"]:
                raise TrialIdMismatch(f"stage {payload['id']}: the worker resolves trial id {spec.trial_id}, the driver "
                                 f"{payload['trial_id']} (different code or plugins on this node?)")
            func = TASKS[payload["kind"]]
            try:
                with scorer_services(payload.get("scorer_services") or {}):
                    out["result"] = func(spec, Path(output), Path(storage), payload)
            except DivergedError as exc:
                out["status"] = "diverged"
                out["error"] = {"type": "DivergedError", "stage": exc.stage, "step": exc.step, "loss": str(exc.loss),
                                "message": str(exc)}
        except BaseException as exc:  # noqa: BLE001 - reported to the driver, which retries or records it
            oom = "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"
            out["status"] = "oom" if oom else "error"
            out["error"] = {"type": type(exc).__name__, "message": redact(str(exc))[:2000],
                            "traceback": redact(traceback.format_exc()), "stage": payload["kind"]}
            log.error("stage %s failed: %s: %s", payload["id"], type(exc).__name__, redact(str(exc)))
        finally:
            free_memory()
    out["ended_at"] = time.time()
    out["seconds"] = round(out["ended_at"] - started, 3)
    return out
