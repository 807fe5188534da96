"""``harness run``: one defence x attack cell end to end, or its plan (``--dry-run``).

    harness run --defence repnoise --attack harmfulqa [--model ID_OR_FOLDER] [--preset NAME]
                [--set key=value ...] [--eval NAMES] [--output DIR] [--dry-run] [--force]

The spec is resolved and validated (names, then fields, then every component's config) before
anything heavy is imported; the trial pipeline (torch, transformers) is imported only to run.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from harness.api.config import RunSpec, resolve
from harness.api.record import TrialRecord
from harness.api.registry import ATTACKS, DEFENCES
from harness.api.secrets import redact


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


def spec_from_args(args) -> RunSpec:
    sets = list(args.sets) + ([f"eval.extra={args.evals}"] if getattr(args, "evals", None) else [])
    return resolve(args.preset, defence=args.defence, attack=args.attack, model=args.model, seed=args.seed,
                   sets=sets)


def plan(spec: RunSpec) -> dict[str, Any]:
    """What a run will do, with every resolved hyper-parameter (the ``--dry-run`` output)."""
    c = spec.canonical()
    d_cls, a_cls = DEFENCES.get(spec.defence.name), ATTACKS.get(spec.attack.name)
    stages = [{"stage": "load model", "model": c["model"]}]
    if d_cls.changes_model:
        stages.append({"stage": "defence", **c["defence"], "needs_data": d_cls.needs_data,
                       "checkpoint_key": spec.defence_key()})
    stages.append({"stage": "pre-attack evaluation", "evaluation": a_cls.evaluation, **c["eval"]})
    stages.append({"stage": "attack", **c["attack"]})
    stages.append({"stage": "post-attack evaluation", "evaluation": a_cls.evaluation})
    from harness.pipeline.fidelity import data_plan, fidelity_section  # reads local data for the row counts

    return {"trial_id": spec.trial_id, "preset": spec.preset, "seed": spec.seed, "stages": stages,
            "data": data_plan(spec), "fidelity": fidelity_section(spec), "config": c}


def cmd_run(args) -> int:
    if args.dry_run and args.defence is None:
        return dry_run_all_defences(args)
    spec = spec_from_args(args)
    if args.dry_run:
        print(redact(json.dumps(plan(spec), indent=2)))
        return 0
    from harness.pipeline.trial import run_trial  # torch: only once the input is known to be good

    rec = run_trial(spec, args.output, checkpoints=args.checkpoints, force=args.force, progress=not args.no_progress)
    print(redact(summary_text(rec)))
    return 0 if rec.status == "ok" else 1


def dry_run_all_defences(args) -> int:
    """``--dry-run`` without ``--defence``: the plan for every registered defence under the preset."""
    from harness.pipeline.fidelity import data_plan, fidelity_section  # reads local data for the row counts

    plans = {}
    for name in DEFENCES.names():
        args.defence = name
        spec = spec_from_args(args)
        c = spec.canonical()
        plans[name] = {"trial_id": spec.trial_id, "defence": c["defence"], "checkpoint_key": spec.defence_key(),
                       "fidelity": fidelity_section(spec, only="defence")}
    args.defence = None
    spec = spec_from_args(args)
    c = spec.canonical()
    print(redact(json.dumps({"preset": spec.preset, "model": c["model"], "seed": c["seed"], "disjoint": c["disjoint"],
                             "attack": c["attack"], "eval": c["eval"], "data": data_plan(spec),
                             "fidelity": fidelity_section(spec, only="run"), "defences": plans}, indent=2)))
    return 0


ROUGE_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}


def metric_text(payload: dict[str, Any]) -> str:
    """The measured numbers of an extra evaluation's payload, never its settings (lr, epochs, sizes):
    lm-eval task scores, ROUGE, or ``loss``/``ppl`` of named parts (answer_loss); "" otherwise."""
    def fnum(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(payload.get("tasks"), dict):  # capability (lm-eval)
        return "  ".join(f"{t} {row['score']:.3f}" for t, row in payload["tasks"].items()
                         if isinstance(row, dict) and fnum(row.get("score")))
    parts = [f"{label} {payload[k]:.3f}" for k, label in ROUGE_NAMES.items() if fnum(payload.get(k))]
    for key, sub in payload.items():  # answer_loss: {"harmful": {"loss", "ppl"}, "harmless": {...}}
        if isinstance(sub, dict) and fnum(sub.get("loss")):
            parts.append(f"{key} loss {sub['loss']:.3f}" + (f" (ppl {sub['ppl']:.2f})" if fnum(sub.get("ppl")) else ""))
    return "  ".join(parts)


def summary_text(rec: TrialRecord) -> str:
    """A few lines for the terminal: status, model, scores per phase, criteria, time."""
    def num(value: Any, fmt: str = ".3f") -> str:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return format(value, fmt) if ok else "—"

    lines = [f"trial {rec.trial_id}: {rec.status}" + (" (already finished: skipped)" if rec.skipped else "")]
    if rec.error:
        lines.append(f"  error in {rec.error.stage}: {rec.error.message}")
    if rec.model:
        lines.append(f"  model: {rec.model.id} [{rec.model.source}]"
                     + (f"  NOTE: {rec.model.fallback}" if rec.model.fallback else ""))
    for phase in ("pre_attack", "post_attack"):
        for name, val in rec.phase(phase).items():
            summary = rec.summary(phase, name) if isinstance(val, dict) and "mean" in val else None
            if summary is not None and summary.mean is not None:
                extra = getattr(summary, "frac_degenerate", None)
                lines.append(f"  {phase:<11} {name:<12} mean {summary.mean:.3f}  >0.5 {num(summary.frac_harmful)}  "
                             f"empty {num(summary.frac_empty)}"
                             + (f"  degenerate {num(extra)}" if isinstance(extra, (int, float)) else "")
                             + f"  n={summary.n}  scorer={summary.scorer.get('scorer')}")
            elif isinstance(val, dict):
                text = metric_text(val)
                if text:
                    lines.append(f"  {phase:<11} {name:<12} {text}")
    crit = rec.criteria
    resistance = crit.get("resistance")
    if isinstance(resistance, dict):
        lines.append(f"  {resistance.get('metric')} after the attack {num(resistance.get('post_attack_mean'))} "
                     f"(before {num(resistance.get('pre_attack_mean'))}); resistance = harm reduction against the "
                     f"undefended model under the same attack: see `harness leaderboard`")
    stability = crit.get("stability")
    if isinstance(stability, dict) and stability.get("mean_gain") is not None:
        lines.append(f"  stability: capability change vs base {num(stability['mean_gain'], '+.3f')} (mean over tasks)")
    trainability = crit.get("trainability")
    if isinstance(trainability, dict) and trainability:
        lines.append("  trainability vs base: " + "  ".join(f"{k} {num(v, '+.3f')}" for k, v in trainability.items()))
    if rec.timings:
        lines.append(f"  time: {rec.timings.get('total_s')} s")
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("run", help="run one defence x attack cell end to end",
                       description="Run one defence x attack cell: defend, score, attack, score, write a record.")
    add_spec_args(p)
    p.add_argument("--output", default="results", help="results folder (default: results/)")
    p.add_argument("--checkpoints", help="defended-checkpoint folder (default: OUTPUT/checkpoints)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit (loads no model)")
    p.add_argument("--force", action="store_true", help="rerun even if the trial already finished")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)
