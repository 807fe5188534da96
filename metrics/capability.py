"""Capability (the "stability" criterion): lm-evaluation-harness benchmarks on the in-memory model.

Method: the paper (RepNoise, Rosati et al., NeurIPS 2024, Table 3) checks that a defence keeps
general capability by running EleutherAI's lm-evaluation-harness on the defended model and
comparing with the base model: TruthfulQA, MMLU, HellaSwag, WinoGrande, ARC (easy and
challenge), ETHICS and CrowS-Pairs. Multiple-choice tasks score each choice by the summed
log-likelihood of its tokens given the context,

    acc = mean_i [ argmax_c log p(choice_c | context_i) == gold_i ],
    acc_norm uses log p / len(choice_c in bytes),

TruthfulQA-MC2 is the normalised probability mass on the true answers, and CrowS-Pairs
``pct_stereotype`` the fraction of pairs where the stereotyped sentence is more likely (lower is
better). Every metric comes with lm-eval's standard error.

The model is wrapped as ``HFLM(pretrained=<model object>, tokenizer=<copy>)``: no reload, no
second copy of the weights. lm-eval task names used by default: ``truthfulqa_mc2``,
``mmlu`` (group), ``hellaswag``, ``winogrande``, ``arc_easy``, ``arc_challenge``,
``ethics_cm_parquet`` and ``crows_pairs_english``.

ETHICS commonsense is ``ethics_cm_parquet``, a task bundled here (``lm_eval_tasks/``) in place of
lm-eval's ``ethics_cm``: that task loads ``EleutherAI/hendrycks_ethics`` through a loading script,
which ``datasets`` 4 and later refuse (lm-eval issue #3171), so the run would fail at the first
capability evaluation, after the defence and the attack. The bundled task is ``ethics_cm`` with
the same prompt, choices, target and metric, reading the hub's parquet conversion of the same
dataset (revision ``refs/convert/parquet``: the script's output). ``ethics_cm`` itself can still be
named in ``tasks`` with ``datasets`` < 4; the pre-flight (``harness.pipeline.preflight``) reports a
task whose dataset cannot load before any training. Defaults: zero-shot (each task's own default), batch 8, no limit
(``limit`` caps examples per task for quick runs), bootstrap 100000 as lm-eval. ``include_path``
adds local task YAMLs (offline use); ``include_defaults=False`` skips indexing lm-eval's
thousands of built-in tasks when only local ones are run.

Output: ``{"tasks": {name: {"score": primary metric, "metric": its name, "<metric>": value,
"<metric>_stderr": value, "n": examples, "higher_is_better": bool}}, "subtasks": {...members of
groups, same shape...}, "n_shot", "versions", "lm_eval_version", ...}``; a group's row (MMLU)
carries lm-eval's size-weighted aggregate and ``"group": true``.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import Field, field_validator

from harness.api.components import ComponentConfig, Evaluation
from harness.api.errors import ConfigError
from harness.api.registry import METRICS

log = logging.getLogger(__name__)

PAPER_TASKS = ["truthfulqa_mc2", "mmlu", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "ethics_cm_parquet",
               "crows_pairs_english"]
# primary metric per task output, in order of preference
PRIMARY = ("acc", "pct_stereotype", "acc_norm", "mc2", "exact_match", "f1", "word_perplexity")


def _split(v):
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return v


def _clean(value: Any) -> Any:
    """JSON-safe value: lm-eval reports a missing stderr as the string "N/A"."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (int, str, bool)) or value is None:
        return None if value == "N/A" else value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def flatten_metrics(entry: dict[str, Any]) -> dict[str, Any]:
    """``{"acc,none": x, "acc_stderr,none": s, ...}`` -> ``{"acc": x, "acc_stderr": s, ...}``.

    A filter other than ``none`` is kept as a suffix (``exact_match/strict-match``).
    """
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric}/{filt}"
        out[name] = _clean(value)
    return out


def primary_metric(metrics: dict[str, Any]) -> Optional[str]:
    names = [k for k in metrics if not k.endswith("_stderr") and "_stderr/" not in k]
    for want in PRIMARY:
        for name in names:
            if name == want or name.startswith(want + "/"):
                return name
    return names[0] if names else None


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's result dict -> the JSON record of this evaluation.

    ``tasks`` holds the top-level entries (the tasks and groups that were asked for, and the
    members of a tag, which has no aggregate); ``subtasks`` the members of groups (MMLU's 57
    subjects), so a mean over ``tasks`` does not weight MMLU 57 times.
    """
    members = {t for subs in (results.get("group_subtasks") or {}).values() for t in subs}
    groups = set((results.get("groups") or {}).keys())
    n_samples = results.get("n-samples") or {}
    out: dict[str, Any] = {"tasks": {}, "subtasks": {}}
    for name, entry in (results.get("results") or {}).items():
        metrics = flatten_metrics(entry)
        main = primary_metric(metrics)
        row: dict[str, Any] = {"score": metrics.get(main) if main else None, "metric": main, **metrics}
        if name in n_samples:
            row["n"] = n_samples[name].get("effective")
        elif "sample_len" in entry:
            row["n"] = entry["sample_len"]
        hib = (results.get("higher_is_better") or {}).get(name) or {}
        if main and main.split("/")[0] in hib:
            row["higher_is_better"] = bool(hib[main.split("/")[0]])
        if name in groups:
            row["group"] = True
        out["subtasks" if name in members else "tasks"][name] = row
    out["n_shot"] = {k: _clean(v) for k, v in (results.get("n-shot") or {}).items()}
    out["versions"] = {k: _clean(v) for k, v in (results.get("versions") or {}).items()}
    return out


BUNDLED_TASKS = Path(__file__).parent / "lm_eval_tasks"


@METRICS.register("capability")
class Capability(Evaluation):
    """lm-eval benchmarks (TruthfulQA, MMLU, HellaSwag, WinoGrande, ARC, ETHICS, CrowS-Pairs) on the in-memory model."""

    class Config(ComponentConfig):
        tasks: list[str] = Field(default_factory=lambda: list(PAPER_TASKS), min_length=1,
                                 description="lm-eval task, group or tag names")
        limit: Optional[Union[int, float]] = Field(None, gt=0, description="examples per task (float < 1: fraction)")
        num_fewshot: Optional[int] = Field(None, ge=0, description="None = each task's default")
        batch_size: Union[int, str] = Field(8, description="int or 'auto'")
        max_length: Optional[int] = Field(None, gt=0, description="context length (default: the model's)")
        include_path: Optional[Union[str, list[str]]] = Field(None, description="folders of extra task YAMLs")
        include_defaults: bool = Field(True, description="also index lm-eval's built-in tasks")
        bootstrap_iters: int = Field(100000, ge=0, description="bootstrap samples for non-mean stderrs")
        apply_chat_template: bool = False
        log_samples: bool = False

        @field_validator("tasks", mode="before")
        @classmethod
        def _tasks(cls, v):
            return _split(v)

        @field_validator("batch_size")
        @classmethod
        def _bs(cls, v):
            if isinstance(v, str) and not (v == "auto" or v.startswith("auto:") or v.isdigit()):
                raise ValueError("batch_size must be an integer or 'auto'")
            if isinstance(v, int) and v <= 0:
                raise ValueError("batch_size must be > 0")
            return v

    def _task_manager(self):
        from lm_eval.tasks import TaskManager

        include = self.config.include_path
        paths = [include] if isinstance(include, str) else list(include or [])
        for p in paths:
            if not Path(p).expanduser().is_dir():
                raise ConfigError(f"capability.include_path: {p!r} is not a folder")
        # the harness's own offline tasks (smoke_arith) are always indexable
        paths.append(str(BUNDLED_TASKS))
        return TaskManager(include_path=[str(Path(p).expanduser()) for p in paths] or None,
                           include_defaults=self.config.include_defaults)

    def check_ready(self) -> None:
        """Fail early on task names lm-eval does not know."""
        tm = self._task_manager()
        known = set(tm.all_tasks)
        unknown = [t for t in self.config.tasks if t not in known]
        if unknown:
            import difflib

            hints = {t: difflib.get_close_matches(t, sorted(known), n=2) for t in unknown}
            detail = "; ".join(f"{t!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items())
            raise ConfigError(f"capability.tasks: unknown lm-eval task(s): {detail}")

    def evaluate(self, model, tokenizer, ctx) -> dict[str, Any]:
        import lm_eval
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        cfg = self.config
        was_training = model.training
        # lm-eval may set pad token / padding side on the tokenizer it is given: give it a copy
        tok = copy.deepcopy(tokenizer)
        device = str(getattr(model, "device", ctx.device))
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.batch_size, max_length=cfg.max_length,
                  device=device)
        try:
            results = simple_evaluate(
                model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                task_manager=self._task_manager(), bootstrap_iters=cfg.bootstrap_iters,
                log_samples=cfg.log_samples, apply_chat_template=cfg.apply_chat_template,
                random_seed=ctx.seed, numpy_random_seed=ctx.seed, torch_random_seed=ctx.seed,
                fewshot_random_seed=ctx.seed)
        finally:
            model.train(was_training)
        if results is None:  # non-zero ranks in a distributed run
            return {}
        out = summarize(results)
        out.update({"requested": list(cfg.tasks), "limit": cfg.limit, "num_fewshot": cfg.num_fewshot,
                    "lm_eval_version": getattr(lm_eval, "__version__", None) or _version("lm_eval")})
        log.info("%s capability: %s", ctx.stage,
                 ", ".join(f"{k} {v['metric']}={v['score']}" for k, v in out["tasks"].items()))
        return out


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
