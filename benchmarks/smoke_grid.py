"""The full smoke grid through ``harness sweep``: wall time, and each stage kind's share of it.

Issue 15, goal 4: the smoke grid of the results issue (``harness sweep --preset smoke``: 4 defences x
attack lr {3e-5, 8e-5, 2e-4} x seeds {0, 1, 2} = 36 cells on SmolLM2-135M, offline) regenerates in
<= 60 min on 2 CPU cores. Each defended model is trained once, its pre-attack evaluation runs once,
and the 36 attack cells share them (the sweep's DAG).

    python benchmarks/smoke_grid.py [--results results/smoke] [--isolate reuse] [--out FILE]
    python benchmarks/smoke_grid.py --from results/smoke --out FILE    # analyse a finished sweep only

Without ``--from`` it runs the sweep in a subprocess (resuming whatever is already in ``--results``:
start from an empty folder for a clean figure) and times it. Then it reads the sweep's own state
(``RESULTS/_sweep/state.json``: each stage's start, end and seconds, measured in the workers) and the
cell records (``timings``: seconds per trial stage inside a cell) and prints:

    wall          driver wall time (the subprocess; with ``--from``: first stage start -> last end)
    makespan      first stage start -> last stage end
    per kind      number of stages, summed worker seconds, share of all worker seconds, mean per
                  finished stage, stages not done (pending, running or failed)
    inside cells  the cell's own stages (attack, post-attack evaluation, ...) summed over cells

On 2 cores the sweep runs 2 single-threaded workers at once (Ray sets one thread per 1-CPU task), so
summed worker seconds are about 2x the makespan when both are busy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 60 * 60


def analyse(results: Path, wall_s: float | None = None) -> dict:
    state = json.loads((results / "_sweep" / "state.json").read_text())
    stages = state["stages"]
    kinds: dict[str, dict] = defaultdict(lambda: {"stages": 0, "timed": 0, "seconds": 0.0, "not_done": 0})
    starts, ends = [], []
    for st in stages.values():
        k = kinds[st["kind"]]
        k["stages"] += 1
        if st.get("seconds") is not None:
            k["seconds"] += float(st["seconds"])
            k["timed"] += 1
        if st.get("status") not in ("done", "skipped"):
            k["not_done"] += 1
        if st.get("started_at"):
            starts.append(st["started_at"])
        if st.get("ended_at"):
            ends.append(st["ended_at"])
    total = sum(k["seconds"] for k in kinds.values()) or 1.0
    for k in kinds.values():
        k["share"] = round(k["seconds"] / total, 3)
        k["mean_s"] = round(k["seconds"] / max(k["timed"], 1), 1)
        k["seconds"] = round(k["seconds"], 1)
    makespan = (max(ends) - min(starts)) if starts and ends else None

    inside: dict[str, float] = defaultdict(float)
    n_records = 0
    for path in sorted(results.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict) or "timings" not in rec:
            continue
        n_records += 1
        for name, sec in (rec.get("timings") or {}).items():
            if name != "total_s" and isinstance(sec, (int, float)):
                inside[name.removesuffix("_s")] += float(sec)
    wall = wall_s if wall_s is not None else makespan
    return {
        "results": str(results),
        "cells": state.get("cells", {}).get("total"),
        "records": n_records,
        "status": state.get("status"),
        "wall_s": round(wall, 1) if wall is not None else None,
        "makespan_s": round(makespan, 1) if makespan is not None else None,
        "goal_s": GOAL_S,
        "goal_met": bool(wall is not None and wall <= GOAL_S and state.get("status") in ("done", "finished")),
        "worker_seconds": round(total, 1),
        "kinds": dict(kinds),
        "inside_cells_s": {k: round(v, 1) for k, v in sorted(inside.items(), key=lambda kv: -kv[1])},
        "cpus": os.cpu_count(),
    }


def report(r: dict) -> str:
    lines = [f"smoke grid: {r['cells']} cells, {r['records']} records, sweep status {r['status']}",
             f"wall {r['wall_s']} s ({(r['wall_s'] or 0) / 60:.1f} min; goal <= {r['goal_s'] // 60} min: "
             f"{'met' if r['goal_met'] else 'NOT met'}), makespan {r['makespan_s']} s, "
             f"worker seconds {r['worker_seconds']} on {r['cpus']} CPUs",
             f"{'stage kind':<12}{'stages':>7}{'seconds':>10}{'share':>8}{'mean s':>9}{'not done':>10}"]
    for name, k in sorted(r["kinds"].items(), key=lambda kv: -kv[1]["seconds"]):
        lines.append(f"{name:<12}{k['stages']:>7}{k['seconds']:>10.1f}{k['share']:>8.1%}{k['mean_s']:>9.1f}"
                     f"{k['not_done']:>10}")
    if r["inside_cells_s"]:
        lines.append("inside the records (seconds summed over trials): "
                     + ", ".join(f"{k} {v:.0f}" for k, v in r["inside_cells_s"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results/smoke", help="sweep output folder (default results/smoke)")
    ap.add_argument("--from", dest="from_", metavar="RESULTS", help="only analyse this finished sweep")
    ap.add_argument("--isolate", choices=["reuse", "process"], default="reuse",
                    help="reuse (default on CPU): warm workers; process: a fresh worker per stage")
    ap.add_argument("--harness", default=None, help="harness command (default: this Python's harness)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)

    wall = None
    if args.from_:
        results = Path(args.from_)
    else:
        results = Path(args.results)
        cmd = ([args.harness] if args.harness else [sys.executable, "-m", "harness.cli.main"]) + [
            "sweep", "--preset", "smoke", "--output", str(results), "--isolate", args.isolate, "--no-progress"]
        env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
        print("running:", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        wall = time.perf_counter() - t0
        if rc != 0:
            print(f"the sweep exited with {rc}", file=sys.stderr)
    if not (results / "_sweep" / "state.json").is_file():
        print(f"error: no sweep state in {results}/_sweep/state.json", file=sys.stderr)
        return 2
    r = analyse(results, wall)
    print(report(r))
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
