"""Wall time of the README's first command on a fresh machine, and of a later cell (issue 15, goal 3).

Goal: the first smoke cell after install (``harness run --defence none --attack harmfulqa`` with an
empty cache: the embedded model converted, the missing answers generated) <= 180 s on 2 CPU cores;
a later cell (cache warm) <= 90 s.

    python benchmarks/first_cell.py [--defence none[,repnoise]] [--set KEY=VALUE ...]
                                    [--later-set KEY=VALUE ...] [--keep DIR] [--out FILE]

For each defence it runs, each in a subprocess with the same interpreter's ``harness`` command:

    first   ``harness run --defence D --attack harmfulqa`` with a new, empty ``HARNESS_CACHE`` and
            results folder (what the first run on a fresh install pays: model conversion, synthesis)
    later   the same command (plus ``--later-set`` edits, e.g. another ``attack.lr`` for another
            cell of the grid) with the cache the first run filled and a new results folder

and reads the trial record each run wrote: its ``timings`` (stage -> seconds, ``total_s`` the trial
inside the process) and the model source. It prints per run the process wall time (interpreter
start and imports included: what a user waits for), the record's stage seconds, and whether the goal
is met, and writes all of it as JSON with ``--out``. ``--set`` edits go to both runs (e.g.
``--set eval.samples=4 --set attack.samples=8`` for a quick check of this script; such a run says
nothing about the goal). The cache holds only what ``HARNESS_CACHE`` points at: a model already in
the Hugging Face cache is read from there (the record's ``model.source`` says which).
The machine's load average at the start is recorded: time it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOALS_S = {"first": 180.0, "later": 90.0}
ATTACK = "harmfulqa"


def harness_command() -> list[str]:
    """The ``harness`` entry point next to this interpreter (the README's ``.venv/bin/harness``),
    else the module."""
    script = Path(sys.executable).with_name("harness")
    return [str(script)] if script.exists() else [sys.executable, "-m", "harness.cli"]


def read_record(results: Path) -> dict | None:
    """The trial record in ``results`` (the only ``<trial_id>.json`` a single run writes)."""
    for path in sorted(results.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "trial_id" in data and "timings" in data:
            return data
    return None


def run_cell(label: str, defence: str, sets: list[str], cache: Path, results: Path, log_file: Path) -> dict:
    prefix = harness_command()
    cmd = prefix + ["run", "--defence", defence, "--attack", ATTACK, "--output", str(results)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "HARNESS_CACHE": str(cache)}
    t0 = time.perf_counter()
    with log_file.open("w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    rec = read_record(results) or {}
    goal = GOALS_S[label]
    out = {"run": label, "defence": defence, "command": " ".join(["harness"] + cmd[len(prefix):]),
           "sets": sets, "rc": proc.returncode, "status": rec.get("status"), "wall_s": round(wall, 1),
           "timings": rec.get("timings", {}), "model_source": (rec.get("model") or {}).get("source"),
           "eval_batch_size": (((rec.get("scores") or {}).get("pre_attack") or {}).get("harmfulness")
                               or {}).get("batch_size"),
           "synthesized": [{k: s.get(k) for k in ("role", "kind", "generated", "cached")}
                           for s in (rec.get("data") or {}).get("synthesized", [])],
           "goal_s": goal, "goal_met": proc.returncode == 0 and wall <= goal, "log": str(log_file)}
    if proc.returncode != 0:  # the log may live in a temp folder that is deleted at the end
        out["log_tail"] = log_file.read_text(errors="replace").splitlines()[-20:]
    return out


def show(r: dict) -> str:
    stages = ", ".join(f"{k[:-2] if k.endswith('_s') else k} {v:.1f}" for k, v in r["timings"].items())
    verdict = "met" if r["goal_met"] else "NOT met"
    failed = ("" if r["rc"] == 0 else
              f"  [exit {r['rc']}, status {r['status']}]\n      " + "\n      ".join(r["log_tail"]))
    return (f"{r['run']:<5} {r['defence']:<10} wall {r['wall_s']:6.1f} s  (goal <= {r['goal_s']:.0f} s: {verdict})"
            f"{failed}\n      stages (s): {stages or 'no record'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--defence", default="none", help="comma-separated defences (default none; e.g. none,repnoise)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="spec edit passed to both runs (quick checks only)")
    ap.add_argument("--later-set", dest="later_sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra spec edit for the later run only (another cell of the grid)")
    ap.add_argument("--keep", help="keep caches, results and logs in this folder (default: a deleted temp folder)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    defences = [d.strip() for d in args.defence.split(",") if d.strip()]
    if not defences:
        ap.error("--defence: give at least one defence name")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="first-cell-"))
    root.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    runs = []
    try:
        for d in defences:
            cache = root / d / "cache"
            cache.parent.mkdir(parents=True, exist_ok=True)
            if cache.exists():
                shutil.rmtree(cache)  # the first run starts from an empty cache
            for label, sets in (("first", args.sets), ("later", args.sets + args.later_sets)):
                results = root / d / f"results-{label}"
                if results.exists():
                    shutil.rmtree(results)
                r = run_cell(label, d, sets, cache, results, root / d / f"{label}.log")
                runs.append(r)
                print(show(r), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result = {"goal_s": GOALS_S, "cpus": os.cpu_count(), "load_avg_1min_at_start": load,
              "quick": bool(args.sets), "runs": runs,
              "all_goals_met": all(r["goal_met"] for r in runs)}
    if args.sets:
        print("note: --set edits given: a quick check of the script, not a measurement of the goal")
    print(f"goals met: {'yes' if result['all_goals_met'] else 'no'}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
