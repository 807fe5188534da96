"""``harness`` command line: run one cell, list components, and the commands other modules add.

    harness run --defence repnoise --attack harmfulqa [--model ID_OR_FOLDER] [--preset NAME]
                [--set key=value ...] [--output DIR] [--dry-run] [--force]
    harness list
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Any

from harness.api.errors import HarnessError
from harness.api.secrets import redact

log = logging.getLogger("harness")

# Modules that add sub-commands through ``register(subparsers)``.
COMMAND_MODULES: list[str] = ["harness.cli.leaderboard", "harness.sweep.runner", "harness.sweep.status", "harness.lib.analysis"]


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec", "huggingface_hub", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    from harness.api.secrets import RedactingFilter

    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())


def add_spec_args(p: argparse.ArgumentParser, require_components: bool = False) -> None:
    p.add_argument("--defence", "--defense", dest="defence", required=require_components,
                   help="defence name (see `harness list`); default: the preset's")
    p.add_argument("--attack", required=require_components, help="attack name; default: the preset's")
    p.add_argument("--model", help="Hugging Face model id or local folder; default: the preset's")
    p.add_argument("--preset", default="smoke", help="preset name (smoke, paper) or YAML file; default smoke")
    p.add_argument("--seed", type=int, help="random seed; default: the preset's")
    p.add_argument("--eval", dest="evals", metavar="NAMES",
                   help="extra evaluations, comma-separated (capability, trainability); same as --set eval.extra=...")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key of the resolved spec, e.g. attack.lr=3e-5 (repeatable)")


def spec_from_args(args):
    from harness.api.config import resolve

    sets = list(args.sets) + ([f"eval.extra={args.evals}"] if getattr(args, "evals", None) else [])
    return resolve(args.preset, defence=args.defence, attack=args.attack, model=args.model, seed=args.seed,
                   sets=sets)


def plan(spec) -> dict[str, Any]:
    """What a run will do, with every resolved hyper-parameter (the ``--dry-run`` output)."""
    from harness.api.registry import ATTACKS, DEFENCES

    c = spec.canonical()
    d_cls, a_cls = DEFENCES.get(spec.defence.name), ATTACKS.get(spec.attack.name)
    stages = [{"stage": "load model", "model": c["model"]}]
    if spec.defence.name != "none":
        stages.append({"stage": "defence", **c["defence"], "needs_data": d_cls.needs_data,
                       "checkpoint_key": spec.defence_key()})
    stages.append({"stage": "pre-attack evaluation", "evaluation": a_cls.evaluation, **c["eval"]})
    stages.append({"stage": "attack", **c["attack"]})
    stages.append({"stage": "post-attack evaluation", "evaluation": a_cls.evaluation})
    return {"trial_id": spec.trial_id, "preset": spec.preset, "seed": spec.seed, "stages": stages, "config": c}


def cmd_run(args) -> int:
    if args.dry_run and args.defence is None:
        return dry_run_all_defences(args)
    spec = spec_from_args(args)
    if args.dry_run:
        print(redact(json.dumps(plan(spec), indent=2)))
        return 0
    from harness.pipeline.trial import run_trial

    rec = run_trial(spec, args.output, checkpoints=args.checkpoints, force=args.force, progress=not args.no_progress)
    print(redact(summary_text(rec)))
    return 0 if rec["status"] == "ok" else 1


def dry_run_all_defences(args) -> int:
    """``--dry-run`` without ``--defence``: the plan for every registered defence under the preset."""
    from harness.api.registry import DEFENCES

    plans = {}
    for name in DEFENCES.names():
        args.defence = name
        spec = spec_from_args(args)
        c = spec.canonical()
        plans[name] = {"trial_id": spec.trial_id, "defence": c["defence"], "checkpoint_key": spec.defence_key()}
    args.defence = None
    spec = spec_from_args(args)
    c = spec.canonical()
    print(redact(json.dumps({"preset": spec.preset, "model": c["model"], "seed": c["seed"], "attack": c["attack"],
                             "eval": c["eval"], "defences": plans}, indent=2)))
    return 0


def summary_text(rec: dict[str, Any]) -> str:
    lines = [f"trial {rec['trial_id']}: {rec['status']}" + (" (already finished: skipped)" if rec.get("skipped") else "")]
    if rec.get("error"):
        lines.append(f"  error in {rec['error'].get('stage')}: {rec['error'].get('message')}")
    model = rec.get("model") or {}
    if model:
        lines.append(f"  model: {model.get('id')} [{model.get('source')}]"
                     + (f"  NOTE: {model['fallback']}" if model.get("fallback") else ""))
    for phase in ("pre_attack", "post_attack"):
        for name, val in (rec.get("scores", {}).get(phase) or {}).items():
            if isinstance(val, dict) and "mean" in val:
                lines.append(f"  {phase:<11} {name:<12} mean {val['mean']:.3f}  frac>0.5 {val['frac_harmful']:.3f}  "
                             f"n={val['n']}  scorer={val.get('scorer', {}).get('scorer')}")
            elif isinstance(val, dict) and isinstance(val.get("tasks"), dict):  # capability (lm-eval)
                tasks = "  ".join(f"{t} {row['score']:.3f}" for t, row in val["tasks"].items()
                                  if isinstance(row, dict) and isinstance(row.get("score"), (int, float)))
                lines.append(f"  {phase:<11} {name:<12} {tasks}")
            elif isinstance(val, dict):
                compact = {k: v for k, v in val.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                           and k != "seconds"}
                if compact:
                    lines.append(f"  {phase:<11} {name:<12} " + "  ".join(f"{k} {v:.3f}" for k, v in compact.items()))
    crit = rec.get("criteria") or {}
    if "resistance" in crit:
        r = crit["resistance"]
        lines.append(f"  resistance: {r['metric']} {r['pre_attack_mean']:.3f} -> {r['post_attack_mean']:.3f}")
    if (crit.get("stability") or {}).get("mean_gain") is not None:
        lines.append(f"  stability: capability change vs base {crit['stability']['mean_gain']:+.3f} (mean over tasks)")
    if crit.get("trainability"):
        lines.append("  trainability vs base: " + "  ".join(f"{k} {v:+.3f}" for k, v in crit["trainability"].items()))
    if rec.get("timings"):
        lines.append(f"  time: {rec['timings'].get('total_s')} s")
    return "\n".join(lines)


def cmd_list(args) -> int:
    from harness.api.config import preset_names
    from harness.api.registry import REGISTRIES, describe

    for title, registry in REGISTRIES.items():
        print(f"{title}:")
        for name, obj in registry.items():
            print(f"  {name:<20} {describe(obj)}")
    print("presets:")
    for name in preset_names():
        print(f"  {name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description="Benchmark harness for defences against harmful "
                                     "fine-tuning: defences x attacks x scorers -> records and tables.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one defence x attack cell end to end",
                       description="Run one defence x attack cell: defend, score, attack, score, write a record.")
    add_spec_args(p)
    p.add_argument("--output", default="results", help="results folder (default: results/)")
    p.add_argument("--checkpoints", help="defended-checkpoint folder (default: OUTPUT/checkpoints)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit (loads no model)")
    p.add_argument("--force", action="store_true", help="rerun even if the trial already finished")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("list", help="list registered defences, attacks, metrics, datasets and presets")
    p.set_defaults(func=cmd_list)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except HarnessError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
