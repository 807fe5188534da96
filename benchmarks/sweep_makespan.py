"""Sweep makespan against perfect packing: how well the scheduler keeps the (fake) GPUs busy.

Runs a real sweep on a local Ray with ``--gpus`` fake GPUs (``num_gpus=N``; on CPU each stage
trains and generates on the CPU) and ``--cpus`` CPUs: a small random Llama (4 layers, hidden 256,
~3M parameters, so that stages do some work), defences ``none``
and ``repnoise`` (really trained, on a few smoke pairs) x ``--lrs`` attack learning rates x
``--sample-counts`` attack sample counts (default 2 x 2 x 2 = 8 cells: 1 data stage that writes the
missing answers/refusals, 1 defence training, 2 pre-attack evaluations, 8 attacks + evaluations),
every stage on one (fake) GPU.

    makespan    = first stage start -> last stage end (the stages' own timestamps; the driver's
                  wall time, with Ray start-up, is reported separately)
    ideal       = sum over stages of (stage time x GPUs it held) / number of GPUs
    ratio       = makespan / ideal          (1.0 = no GPU ever idle; goal <= 1.2)

Stage times are measured inside the workers (so they include each stage's imports and model
loads); the gaps are what the scheduler and Ray add, plus idling that the DAG forces.

    python benchmarks/sweep_makespan.py [--gpus 2] [--cpus 2] [--isolate reuse|process]
                                        [--out benchmarks/results/sweep_makespan.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2, help="fake GPUs of the local Ray (default 2)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 8e-5])
    ap.add_argument("--sample-counts", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4, help="layers of the random Llama (default 4)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the random Llama (default 256)")
    ap.add_argument("--isolate", choices=["reuse", "process", "both"], default="both",
                    help="process: a fresh worker per stage (the default of real sweeps); reuse: warm workers")
    ap.add_argument("--workdir", help="keep the sweep here (default: a temporary folder)")
    ap.add_argument("--out", help="write the result JSON here")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sweep-makespan-"))
    work.mkdir(parents=True, exist_ok=True)

    from harness.cli import setup_logging
    from harness.lib.tiny import build_tiny

    setup_logging()
    tiny = work / f"llama-{args.layers}x{args.hidden}"
    if not (tiny / "config.json").exists():
        build_tiny(tiny, arch="llama", layers=args.layers, hidden=args.hidden)
    modes = ["process", "reuse"] if args.isolate == "both" else [args.isolate]
    results = {mode: run_mode(args, mode, tiny, work) for mode in modes}
    result = results if len(results) > 1 else next(iter(results.values()))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["records"].get("ok") == r["cells"] for r in results.values()) else 1


def run_mode(args, isolate: str, tiny: Path, work: Path) -> dict:
    import ray

    from harness.sweep.runner import SweepRunner, connect
    from harness.sweep.dag import build
    from harness.sweep.grid import SweepSpec

    # a fresh cache: the data stage really generates the missing texts (workers inherit it from Ray)
    os.environ["HARNESS_CACHE"] = str(work / f"cache-{isolate}-{int(time.time())}")
    t0 = time.time()
    connect(num_cpus=args.cpus, num_gpus=args.gpus)
    ray_start = time.time() - t0
    spec = SweepSpec(
        preset="smoke", name="makespan",
        defences=["none", {"name": "repnoise", "samples": 16, "batch_size": 4, "max_length": 64}],
        attacks=["harmfulqa"], attack_lr=args.lrs, attack_samples=args.sample_counts,
        set={"eval.toxicity_scorer.name": "keyword_refusal", "eval.samples": args.eval_samples,
             "eval.max_new_tokens": 24, "eval.batch_size": 8, "attack.max_length": 64, "attack.batch_size": 4,
             "synth.max_new_tokens": 24},
        retries=0, isolate=isolate, resources={"default": {"num_gpus": 1, "num_cpus": 1}})
    out = work / f"results-{isolate}-{int(time.time())}"
    sweep = build(spec, "smoke", output=str(out), models=[str(tiny)])
    n_cells = len(sweep.cells)

    runner = SweepRunner(sweep, progress=True)
    t1 = time.time()
    summary = runner.run()
    wall = time.time() - t1
    ray.shutdown()
    stages = [s for s in runner.state["stages"].values() if s["status"] == "done"]
    start = min(s["started_at"] for s in stages)
    end = max(s["ended_at"] for s in stages)
    makespan = end - start
    busy = sum(s["seconds"] * s["gpus"] for s in stages)
    ideal = busy / args.gpus
    by_kind: dict[str, list[float]] = {}
    for s in stages:
        by_kind.setdefault(s["kind"], []).append(s["seconds"])
    result = {
        "cells": n_cells, "stages": len(stages), "gpus": args.gpus, "cpus": args.cpus, "isolate": isolate,
        "records": summary["records"], "makespan_s": round(makespan, 2), "ideal_s": round(ideal, 2),
        "ratio": round(makespan / ideal, 3), "driver_wall_s": round(wall, 2), "ray_start_s": round(ray_start, 2),
        "stage_seconds": {k: {"n": len(v), "mean": round(sum(v) / len(v), 2), "max": round(max(v), 2)}
                          for k, v in by_kind.items()},
        "critical_path_s": round(max(_chain(sweep, runner.state["stages"]).values()), 2),
    }
    return result


def _chain(sweep, stages) -> dict[str, float]:
    """Longest measured path ending at each stage (a second lower bound of the makespan)."""
    out: dict[str, float] = {}
    for sid, st in sweep.stages.items():
        secs = stages[sid]["seconds"] or 0.0
        out[sid] = secs + max((out.get(d, 0.0) for d in st.deps), default=0.0)
    return out


if __name__ == "__main__":
    sys.exit(main())
