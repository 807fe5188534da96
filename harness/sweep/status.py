"""``harness status RESULTS_DIR``: where a sweep stands, from any machine that sees its folder.

Reads ``RESULTS_DIR/_sweep/state.json`` (written atomically by the sweep driver at most once a
second) and the records themselves (the truth about cells). Shows per stage kind how many stages
are done / running / pending / failed, the running stages with their elapsed time, the failures
with their first error line, the cells by record status, the time left and whether the driver is
alive (its process when on this host, else how long ago it last wrote the state).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from harness.api.errors import HarnessError
from harness.api.record import RecordError
from harness.lib.store import load_records
from harness.sweep.grid import SWEEP_DIR, format_seconds

STALE_S = 120.0


def read_state(folder: str | os.PathLike) -> Optional[dict[str, Any]]:
    path = Path(folder) / SWEEP_DIR / "state.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None


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


def collect(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.exists():
        raise HarnessError(f"results folder {str(folder)!r} does not exist")
    state = read_state(folder)
    errors: list[RecordError] = []
    records = load_records(folder, errors)
    by_status: dict[str, int] = {}
    for rec in records:
        by_status[rec.status] = by_status.get(rec.status, 0) + 1
    out: dict[str, Any] = {"folder": str(folder), "records": by_status, "n_records": len(records),
                           "unreadable": [str(e) for e in errors], "sweep": None}
    if state is None:
        return out
    now = time.time()
    counts: dict[str, dict[str, int]] = {}
    running, failed = [], []
    for sid, s in state.get("stages", {}).items():
        k = counts.setdefault(s["kind"], {"total": 0, "done": 0, "running": 0, "pending": 0, "failed": 0,
                                          "skipped": 0})
        k["total"] += 1
        st = {"cancelled": "failed"}.get(s["status"], s["status"])
        k[st] = k.get(st, 0) + 1
        if s["status"] == "running":
            running.append({"id": sid, "label": s.get("label"), "attempt": s.get("attempts"),
                            "elapsed_s": round(now - s["started_at"], 1) if s.get("started_at") else None,
                            "estimate_s": s.get("estimate_s")})
        elif s["status"] in ("failed", "cancelled"):
            failed.append({"id": sid, "label": s.get("label"), "status": s["status"], "error": s.get("error"),
                           "attempts": s.get("attempts")})
    alive = driver_alive(state)
    age = now - state.get("updated_at", now)
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
    unreadable = info.get("unreadable") or []
    if unreadable:
        lines.append(f"{len(unreadable)} record file(s) could not be read (not counted above):")
        lines += [f"  {line}" for line in unreadable]
    return "\n".join(lines)


def cmd_status(args) -> int:
    while True:
        info = collect(args.results)
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            print(format_status(info))
        if not args.watch:
            return 0
        time.sleep(args.watch)
        print()


def register(sub) -> None:
    p = sub.add_parser("status", help="progress of a sweep (running here or elsewhere) from its results folder",
                       description="Show a sweep's stages (done/running/pending/failed), failures, cells and time left "
                                   "from RESULTS_DIR/_sweep/state.json and the records.")
    p.add_argument("results", help="the sweep's results folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="repeat every SECONDS until interrupted")
    p.set_defaults(func=cmd_status)
