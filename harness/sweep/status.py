"""``harness status RESULTS_DIR``: where a sweep stands, from any machine that sees its folder.

Reads ``RESULTS_DIR/_sweep/state.json`` (written atomically by the sweep driver at most once a
second) and the records themselves (the truth about cells). Shows per stage kind how many stages
are done / running / pending / failed, the running stages with their elapsed time, the failures
with their first error line, the cells by record status, the time left and whether the driver is
alive (its process when on this host, else how long ago it last wrote the state).

Records are counted by status, except that a ``running`` record whose process is gone is counted
(and listed) as ``dead``: its owner's pid no longer exists on this host, nobody holds the trial's
lock, or (from another host) its heartbeat is older than ``harness.lib.locks.STALE_S``
(``harness.lib.locks.owner_state``). A finished record with a rerun in progress (``--force``)
lists that rerun. A folder that is not a readable folder, or a damaged ``state.json``, is one line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, Optional

from harness.api.errors import HarnessError
from harness.api.record import RecordError, TrialRecord
from harness.lib.locks import lock_path, owner_state
from harness.lib.store import load_records, schema_mix
from harness.sweep.grid import SWEEP_DIR, format_seconds

STALE_S = 120.0


class StateError(HarnessError):
    """``state.json`` exists but cannot be used."""


def read_state(folder: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The sweep driver's state, or ``None`` when there is none; ``StateError`` when it is damaged."""
    path = Path(folder) / SWEEP_DIR / "state.json"
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise StateError(f"{path}: cannot be read ({type(exc).__name__}: {getattr(exc, 'strerror', None) or exc})") \
            from None
    if not isinstance(state, dict) or not isinstance(state.get("stages", {}), dict):
        raise StateError(f"{path}: not a sweep state (a JSON object with a 'stages' object)")
    return state


def record_liveness(folder: Path, rec: TrialRecord) -> tuple[str, str]:
    """``(alive|dead|unknown, reason)`` of the process a ``running`` record names."""
    return owner_state(rec.owner, lock_path(folder, rec.trial_id))


def driver_alive(state: dict[str, Any]) -> Optional[bool]:
    """True/False when the driver ran on this host (its pid is checked), else None."""
    driver = state.get("driver") or {}
    if driver.get("host") != socket.gethostname() or not driver.get("pid"):
        return None
    try:
        os.kill(int(driver["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def record_warnings(records: list[TrialRecord], folder: str | os.PathLike) -> list[str]:
    """Lines a table built from ``records`` must say: ``running`` records whose process is dead, and
    a set that mixes records read from different schema versions (migrated on read)."""
    lines = []
    for rec in records:
        if rec.status == "running":
            state, reason = record_liveness(Path(folder), rec)
            if state == "dead":
                lines.append(f"trial {rec.trial_id} is counted as 'running' but is dead: {reason}; run it again")
    mix = schema_mix(records)
    if len(mix) > 1:
        lines.append("the records mix schema versions (" + ", ".join(f"{n} of version {v}" for v, n in sorted(mix.items()))
                     + "); older ones were migrated on read: compare their configs before averaging them")
    return lines


def collect(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.exists():
        raise HarnessError(f"results folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise HarnessError(f"results folder {str(folder)!r} is a file, not a folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise HarnessError(f"results folder {str(folder)!r} cannot be read (permission denied)")
    state_error = None
    try:
        state = read_state(folder)
    except StateError as exc:
        state, state_error = None, str(exc)
    errors: list[RecordError] = []
    records = load_records(folder, errors)
    by_status: dict[str, int] = {}
    running, dead, rerunning = [], [], []
    for rec in records:
        status = rec.status
        if status == "running":
            state_, reason = record_liveness(folder, rec)
            entry = {"trial_id": rec.trial_id, "owner": rec.owner, "state": state_, "reason": reason,
                     "started_at": rec.started_at}
            if state_ == "dead":
                status = "dead"
                dead.append(entry)
            else:
                running.append(entry)
        for attempt in rec.attempts:
            owner = getattr(attempt, "owner", None)
            if attempt.status == "running" and isinstance(owner, dict):
                state_, reason = owner_state(owner, lock_path(folder, rec.trial_id))
                if state_ != "dead":
                    rerunning.append({"trial_id": rec.trial_id, "kept": rec.status, "reason": reason})
        by_status[status] = by_status.get(status, 0) + 1
    out: dict[str, Any] = {"folder": str(folder), "records": by_status, "n_records": len(records),
                           "unreadable": [str(e) for e in errors], "sweep": None, "running_records": running,
                           "dead": dead, "rerunning": rerunning, "state_error": state_error}
    if state is None:
        return out
    now = time.time()
    counts: dict[str, dict[str, int]] = {}
    running, failed = [], []
    for sid, s in state.get("stages", {}).items():
        if not isinstance(s, dict) or not isinstance(s.get("kind"), str) or not isinstance(s.get("status"), str):
            out["state_error"] = f"{SWEEP_DIR}/state.json: stage {sid!r} is not a stage entry (skipped)"
            continue
        k = counts.setdefault(s["kind"], {"total": 0, "done": 0, "running": 0, "pending": 0, "failed": 0,
                                          "skipped": 0})
        k["total"] += 1
        st = {"cancelled": "failed"}.get(s["status"], s["status"])
        k[st] = k.get(st, 0) + 1
        if s["status"] == "running":
            running.append({"id": sid, "label": s.get("label"), "attempt": s.get("attempts"),
                            "elapsed_s": round(now - s["started_at"], 1)
                            if isinstance(s.get("started_at"), (int, float)) else None,
                            "estimate_s": s.get("estimate_s")})
        elif s["status"] in ("failed", "cancelled"):
            failed.append({"id": sid, "label": s.get("label"), "status": s["status"], "error": s.get("error"),
                           "attempts": s.get("attempts")})
    alive = driver_alive(state)
    updated = state.get("updated_at", now)
    age = now - updated if isinstance(updated, (int, float)) else float("inf")
    active = state.get("status") == "running" and alive is not False and (alive or age < STALE_S)
    eta = state.get("eta_s")
    if eta is not None and active:
        eta = max(0.0, eta - age)
    out["sweep"] = {"name": state.get("name"), "status": state.get("status") if active or state.get("status") != "running"
                    else "stopped (driver gone; re-run the sweep to resume)",
                    "driver": state.get("driver"), "driver_alive": alive, "updated_s_ago": round(age, 1),
                    "counts": counts, "running": running, "failed": failed,
                    "eta_s": eta if active else None, "cells_total": state.get("cells", {}).get("total"),
                    "elapsed_s": state.get("elapsed_s")}
    return out


def format_status(info: dict[str, Any]) -> str:
    lines = []
    sw = info.get("sweep")
    if sw:
        drv = sw.get("driver") or {}
        lines.append(f"sweep {sw['name']}: {sw['status']} (driver pid {drv.get('pid')} on {drv.get('host')}, "
                     f"state written {sw['updated_s_ago']:.0f}s ago)")
        for kind, k in sw["counts"].items():
            lines.append(f"  {kind:<11} {k['done']:>4} done {k['running']:>3} running {k['pending']:>4} pending "
                         f"{k['failed']:>3} failed {k['skipped']:>4} skipped (of {k['total']})")
        for r in sw["running"]:
            lines.append(f"  running: {r['id']} ({r['label']}), attempt {r['attempt']}, "
                         f"{format_seconds(r['elapsed_s'])} of ~{format_seconds(r['estimate_s'])} (cost model)")
        for f in sw["failed"]:
            lines.append(f"  {f['status']}: {f['id']} ({f['label']}) after {f['attempts']} attempt(s): {f['error']}")
        left = format_seconds(sw["eta_s"]) if sw.get("eta_s") is not None else "-"
        lines.append(f"  elapsed {format_seconds(sw.get('elapsed_s'))}, time left ~{left}")
        total = sw.get("cells_total")
        lines.append(f"cells: {total} in the sweep; records: "
                     + (", ".join(f"{n} {s}" for s, n in sorted(info["records"].items())) or "none yet"))
    else:
        lines.append(f"{info['folder']}: no sweep state (not a sweep folder, or the sweep has not started); records: "
                     + (", ".join(f"{n} {s}" for s, n in sorted(info["records"].items())) or "none"))
    for r in info.get("running_records") or []:
        lines.append(f"running: {r['trial_id']} ({r['reason']})")
    for r in info.get("dead") or []:
        lines.append(f"dead: {r['trial_id']}: record says running, but {r['reason']}; run it again to resume")
    for r in info.get("rerunning") or []:
        lines.append(f"rerunning: {r['trial_id']} (its {r['kept']} result is kept; {r['reason']})")
    if info.get("state_error"):
        lines.append(f"warning: {info['state_error']}")
    unreadable = info.get("unreadable") or []
    if unreadable:
        lines.append(f"{len(unreadable)} record file(s) could not be read (not counted above):")
        lines += [f"  {line}" for line in unreadable]
    return "\n".join(lines)


def cmd_status(args) -> int:
    watch = args.watch
    if watch is not None and not (0.1 <= watch <= 86400):
        raise HarnessError(f"--watch {watch:g}: must be a number of seconds from 0.1 to 86400")
    try:
        while True:
            info = collect(args.results)
            if args.json:
                print(json.dumps(info, indent=2, default=str))
            else:
                print(format_status(info), flush=True)
            if not watch:
                return 0
            time.sleep(watch)
            print()
    except KeyboardInterrupt as exc:
        if getattr(exc, "signum", signal.SIGINT) == signal.SIGINT:
            return 0  # Ctrl-C is how --watch is stopped
        raise


def register(sub) -> None:
    p = sub.add_parser("status", help="progress of a sweep (running here or elsewhere) from its results folder",
                       description="Show a sweep's stages (done/running/pending/failed), failures, cells and time left "
                                   "from RESULTS_DIR/_sweep/state.json and the records.")
    p.add_argument("results", help="the sweep's results folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="repeat every SECONDS until interrupted")
    p.set_defaults(func=cmd_status)
