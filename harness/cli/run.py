"""``harness run``: one defence x attack cell end to end, or its plan (``--dry-run``).

    harness run --defence repnoise --attack harmfulqa [--model ID_OR_FOLDER] [--preset NAME]
                [--set key=value ...] [--eval NAMES] [--output DIR] [--dry-run] [--force]
                [--device auto|cpu|cuda] [--gpus N|IDS] [--keep-checkpoints all|last|none]

Before any model loads, the pre-flight (``harness.lib.memory``) estimates each stage's memory
against the visible GPUs and picks a plan that fits (FSDP over the local GPUs through Ray Train,
gradient checkpointing, micro-batches) or refuses saying what would fit; with the hub reachable it
also checks every hub asset (``harness.pipeline.preflight``). ``--dry-run`` prints the plan under
``memory``; the record keeps it (``plan``, ``train.<stage>.memory``).

The spec is resolved and validated (names, then fields, then every component's config) before
anything heavy is imported; the trial pipeline (torch, transformers) is imported only to run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from harness.api import safeio
from harness.api.config import RunSpec, resolve
from harness.api.errors import ConfigError
from harness.api.record import TrialRecord
from harness.api.registry import ATTACKS, DEFENCES
from harness.api.secrets import redact
from harness.lib.model_files import check_local_model, looks_like_path
from harness.lib.memory import PlanRefused

log = logging.getLogger("harness.run")


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
    evals = getattr(args, "evals", None)
    if evals is not None and not evals.strip(" ,"):
        raise ConfigError("--eval '': empty list of evaluations (an unset shell variable?); name them, e.g. "
                          "--eval capability,trainability, or leave the flag out")
    sets = list(args.sets) + ([f"eval.extra={evals}"] if evals is not None else [])
    if getattr(args, "device", None):
        sets.append(f"model.device={args.device}")
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


GPUS_HELP = ("GPUs to use: N (the first N visible), a list of indices (0,2; as CUDA_VISIBLE_DEVICES), 'all' "
             "(default), or, with --dry-run only, NxPROFILE (plan for hardware not here, e.g. 2xh100; profiles: "
             "h100, h200, a100-80, a100-40, l40s, a10g)")


def select_gpus(value: Optional[str], dry_run: bool = False):
    """``--gpus``: None (use what is visible), or the GPUs to plan for. ``N`` and index lists narrow
    ``CUDA_VISIBLE_DEVICES`` (before CUDA starts); ``NxPROFILE`` returns GPUs of a profile (dry run)."""
    from harness.lib.memory import GPU_PROFILES, profile_gpus

    if value is None or value == "all":
        return None
    m = re.fullmatch(r"(\d+)x([\w-]+)", value.strip().lower())
    if m:
        if not dry_run:
            raise ConfigError(f"--gpus {value!r}: NxPROFILE plans for hardware that is not here; only with --dry-run")
        if m.group(2) not in GPU_PROFILES or m.group(2) == "cpu" or int(m.group(1)) < 1:
            raise ConfigError(f"--gpus {value!r}: profile must be one of "
                              f"{', '.join(k for k in GPU_PROFILES if k != 'cpu')} and N >= 1")
        return profile_gpus(m.group(2), int(m.group(1)))
    current = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if re.fullmatch(r"\d+", value.strip()):
        n = int(value)
        if n < 1:
            raise ConfigError(f"--gpus {value!r}: must be at least 1 (use --device cpu for no GPU)")
        chosen = current[:n] if current else [str(i) for i in range(n)]
    elif re.fullmatch(r"\d+(,\d+)*", value.strip()):
        idx = [int(i) for i in value.split(",")]
        chosen = [current[i] for i in idx if i < len(current)] if current else [str(i) for i in idx]
        if len(chosen) < len(idx):
            raise ConfigError(f"--gpus {value!r}: CUDA_VISIBLE_DEVICES={','.join(current)} has only {len(current)} GPU(s)")
    else:
        raise ConfigError(f"--gpus {value!r}: {GPUS_HELP}")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    from harness.lib.memory import visible_gpus

    found = visible_gpus()
    if len(found) < len(chosen):
        raise ConfigError(f"--gpus {value!r}: asked for {len(chosen)} GPU(s), {len(found)} visible "
                          f"(CUDA_VISIBLE_DEVICES={','.join(chosen)})")
    return found


def memory_plan(spec: RunSpec, gpus=None):
    """The pre-flight's memory plan for ``spec`` on ``gpus`` (default: the visible ones); FSDP is
    considered for the stages ``harness.sweep.fsdp`` supports."""
    from harness.lib.memory import plan_trial
    from harness.sweep.fsdp import unsupported_reason

    return plan_trial(spec, gpus, fsdp_reason=lambda stage: unsupported_reason(stage, spec))


def cmd_run(args) -> int:
    if args.dry_run and args.defence is None:
        return dry_run_all_defences(args)
    spec = spec_from_args(args)
    preflight_args(args, spec)
    gpus = select_gpus(getattr(args, "gpus", None), args.dry_run)
    mplan = memory_plan(spec, gpus)
    if args.dry_run:
        out = plan(spec)
        out["memory"] = mplan.as_dict()
        print(redact(json.dumps(out, indent=2)))
        if not mplan.fits:
            print(f"error: {mplan.message}", file=sys.stderr)
        return 0 if mplan.fits else 1
    from harness.lib.memory import activate, summary_lines
    from harness.pipeline.preflight import hub_checks

    for line in summary_lines(mplan):
        log.info("%s", line)
    mplan.check()  # refuses with what would fit, before any model loads
    problems, notes = hub_checks(spec)
    for note in notes:
        log.info("pre-flight: %s", note)
    if problems:
        raise PlanRefused("pre-flight: " + " | ".join(problems))
    # on CPU the plan trains as configured; not activating it keeps harness run's record equal to a
    # sweep task's (which plans for its own GPU, or none on CPU)
    with activate(mplan) if mplan.device == "cuda" else contextlib.nullcontext():
        rec = run_planned(spec, mplan, args)
    print(redact(summary_text(rec)))
    return 0 if rec.status == "ok" else 1


def run_planned(spec: RunSpec, mplan, args) -> TrialRecord:
    """Run the trial under ``mplan``: a training stage planned on several GPUs runs first as a Ray
    Train FSDP job (``harness.sweep.fsdp.train_fsdp``, as a sweep's stage does), then the trial
    finds its output on disk; checkpoints are pruned after (``--keep-checkpoints``)."""
    from harness.lib.retention import prune
    from harness.pipeline.state import TrialPaths
    from harness.pipeline.trial import run_trial  # torch: only once the input is known to be good

    paths = TrialPaths.of(args.output, args.checkpoints)
    fsdp = mplan.fsdp_stages()
    attacked = None
    if fsdp:
        attacked = run_fsdp_stages(spec, paths, fsdp, args)
    rec = run_trial(spec, args.output, checkpoints=args.checkpoints, force=args.force, progress=not args.no_progress,
                    attacked_from=attacked)
    if attacked is not None and rec.status == "ok" and getattr(args, "keep_checkpoints", "all") != "all":
        shutil.rmtree(attacked, ignore_errors=True)
    if rec.defence_checkpoint is not None and not rec.skipped:
        folder = Path(rec.defence_checkpoint.path)
        prune(paths.checkpoints, getattr(args, "keep_checkpoints", "all"), [folder], last=folder)
    return rec


def run_fsdp_stages(spec: RunSpec, paths, fsdp: dict[str, int], args) -> Optional[Path]:
    """The defence and/or attack of ``spec`` on ``fsdp[stage]`` local GPUs (Ray Train, FSDP2);
    returns the attacked model's folder when the attack ran here."""
    from harness.sweep.dag import attacked_folder
    from harness.sweep.fsdp import train_fsdp
    from harness.sweep.runner import connect

    started = connect(num_gpus=float(max(fsdp.values())))
    try:
        if "defence" in fsdp:
            log.info("defence: FSDP over %d GPUs (Ray Train)", fsdp["defence"])
            train_fsdp("defence", spec, args.output, paths.checkpoints, paths.checkpoints / spec.defence_key(),
                       workers=fsdp["defence"], use_gpu=True)
        if "attack" in fsdp:
            folder = attacked_folder(paths.checkpoints, spec.trial_id)
            log.info("attack: FSDP over %d GPUs (Ray Train)", fsdp["attack"])
            train_fsdp("attack", spec, args.output, paths.checkpoints, folder, workers=fsdp["attack"], use_gpu=True)
            return folder
    finally:
        if started:
            import ray

            ray.shutdown()
    return None


def preflight_args(args, spec: RunSpec) -> None:
    """Before anything reads the model or plans memory (also for ``--dry-run``): ``--output`` and
    ``--checkpoints`` name folders that can be written, and a model folder is whole (config,
    tokenizer, undamaged safetensors: ``harness.lib.model_files``)."""
    safeio.check_output_dir(args.output, "results folder (--output)")
    if args.checkpoints is not None:
        safeio.check_output_dir(args.checkpoints, "checkpoints folder (--checkpoints)")
    if looks_like_path(spec.model.id):
        check_local_model(spec.model.id)


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
    for note in rec.notes:  # substitutions the run made (a fallback scorer, a skipped evaluation): said here too
        lines.append(f"  NOTE: {note}")
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
    add_device_args(p)
    p.set_defaults(func=cmd_run)


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--gpus``, ``--keep-checkpoints`` (``harness run`` and ``harness sweep``)."""
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="where models run (same as --set model.device=...); default: the preset's (auto: CUDA if present)")
    p.add_argument("--gpus", metavar="N|IDS|NxPROFILE", help=GPUS_HELP)
    p.add_argument("--keep-checkpoints", choices=["all", "last", "none"], default="all",
                   help="defended checkpoints to keep: all (default, reused by later trials), last (only the most "
                        "recent), none (removed once the trials that need them are done)")
