"""One ``TrialRecord`` seen through the fields that place it in a table: ``TrialView``.

``trial_views(records)`` labels every record with its row (the defence, plus the parameters that
differ between configurations of the same defence: ``repnoise (beta=0.01)``), its column (attack
name, lr and samples, plus any other attack parameter that differs between records of the same
attack) and its setting (model, attack loss mode, evaluation, scorer, evaluation size): records of
different settings never share a table. Which evaluation a record headlines (harmfulness,
toxicity, ...) is the record's own ``evaluation`` field.

Per-prompt scores come from each record's samples file (``results/samples/<trial_id>.jsonl``,
named by ``record.samples_file``): ``load_samples(records, results_dir)`` reads them into
``Samples`` (rows by phase, or the reason there are none: no file named, file missing, file
unreadable), and ``trial_views(records, samples)`` attaches them to the views. A finished record
without its rows is counted by the tables that need them, never silently replaced.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from harness.api.record import TrialRecord

BASE = "none"
FAILED_STATUSES = ("error", "diverged", "oom")
EVALUATIONS = ("harmfulness", "toxicity")
PHASES = ("post_attack", "pre_attack")


def get(obj: Any, *path: str, default: Any = None) -> Any:
    """``obj[path[0]][path[1]]...`` through nested dicts, or ``default`` where a step is missing."""
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return default
        obj = obj[key]
    return obj


def number(value: Any) -> Optional[float]:
    """A finite float, or None (missing, NaN, a string such as "N/A")."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, dict):  # tolerate {"score": x} / {"fmeasure": x} / {"mean": x}
        for key in ("score", "fmeasure", "mean", "value"):
            if key in value:
                return number(value[key])
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def compact(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def params_label(name: str, params: dict[str, Any], keys: Sequence[str]) -> str:
    if not keys:
        return name
    return f"{name} (" + ", ".join(f"{k}={compact(params.get(k))}" for k in keys) + ")"


def varying_keys(param_dicts: Iterable[dict[str, Any]], skip: Iterable[str] = ()) -> list[str]:
    """Keys whose value is not the same in every dict (a missing key counts as a value)."""
    dicts = list(param_dicts)
    keys = sorted({k for d in dicts for k in d} - set(skip))
    out = []
    for k in keys:
        seen = {json.dumps(d.get(k, "<missing>"), sort_keys=True, default=str) for d in dicts}
        if len(seen) > 1:
            out.append(k)
    return out


@dataclass(frozen=True)
class PromptRow:
    """One scored generation of one phase, as the samples file holds it."""

    key: tuple[str, int]
    """(prompt, occurrence): the prompt text, numbered when the evaluation set repeats it."""
    score: float
    label: Optional[str]
    """The scorer's label (``empty``, ``degenerate``, ``refusal``, ``harmful``, ``harmless``) or None."""
    generation: str
    categories: tuple[str, ...] = ()

    @property
    def prompt(self) -> str:
        return self.key[0]

    @property
    def empty(self) -> bool:
        """The answer is empty: the scorer's label says so, or (no label) the text is blank."""
        return self.label == "empty" if self.label is not None else not self.generation.strip()


@dataclass
class Samples:
    """The per-prompt rows of one trial by phase, or ``missing``: why there are none."""

    phases: dict[str, list[PromptRow]] = field(default_factory=dict)
    missing: Optional[str] = None


MISSING_NO_FILE = "no samples file named"
MISSING_FILE = "samples file missing"
MISSING_UNREADABLE = "samples file unreadable"
MISSING_NOT_LOADED = "samples not loaded"


def parse_samples(lines: Iterable[str]) -> dict[str, list[PromptRow]]:
    """Rows of a samples file (JSON lines ``{"phase", "prompt", "generation", "score", ...}``) by
    phase. ``ValueError`` on a line that is not such an object or has no numeric score."""
    phases: dict[str, list[PromptRow]] = defaultdict(list)
    seen: dict[tuple[str, str], int] = defaultdict(int)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = json.loads(line)
        score = number(row.get("score")) if isinstance(row, dict) else None
        if score is None or not isinstance(row.get("prompt"), str) or not isinstance(row.get("phase"), str):
            raise ValueError(f"line {n}: needs phase, prompt and a numeric score")
        phase, prompt = row["phase"], row["prompt"]
        k = seen[(phase, prompt)]
        seen[(phase, prompt)] += 1
        cats = row.get("categories") or ()
        label = row.get("label")
        phases[phase].append(PromptRow((prompt, k), score, label if isinstance(label, str) else None,
                                       str(row.get("generation") or ""),
                                       tuple(str(c) for c in cats) if isinstance(cats, list) else ()))
    return dict(phases)


def load_samples(records: Iterable[TrialRecord], results_dir: str | Path) -> dict[str, Samples]:
    """The samples of every record (trial id -> ``Samples``), read from ``results_dir``."""
    root = Path(results_dir)
    out: dict[str, Samples] = {}
    for rec in records:
        if not rec.samples_file:
            out[rec.trial_id] = Samples(missing=MISSING_NO_FILE)
            continue
        path = root / rec.samples_file
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            out[rec.trial_id] = Samples(missing=MISSING_FILE)
            continue
        except (OSError, UnicodeDecodeError):
            out[rec.trial_id] = Samples(missing=MISSING_UNREADABLE)
            continue
        try:
            out[rec.trial_id] = Samples(phases=parse_samples(text.splitlines()))
        except (ValueError, json.JSONDecodeError):
            out[rec.trial_id] = Samples(missing=MISSING_UNREADABLE)
    return out


@dataclass
class TrialView:
    """The fields of one record that place it in a table."""

    record: TrialRecord
    trial_id: str
    status: str
    seed: Any
    defence: str
    defence_params: dict[str, Any]
    attack: str
    attack_params: dict[str, Any]
    lr: Optional[float]
    samples: Optional[int]
    loss_on: str
    model: str
    evaluation: str
    scorer: str
    harness: str
    eval_samples: Any
    max_new_tokens: Any
    scorer_key: str = ""
    defence_label: str = ""
    attack_label: str = ""
    per_prompt: Optional[Samples] = None

    def rows(self, phase: str) -> Optional[list[PromptRow]]:
        """The per-prompt rows of ``phase`` (None when the samples are missing or lack the phase)."""
        if self.per_prompt is None or self.per_prompt.missing:
            return None
        return self.per_prompt.phases.get(phase)

    def missing_reason(self, phase: str) -> str:
        """Why ``rows(phase)`` is None."""
        if self.per_prompt is None:
            return MISSING_NOT_LOADED
        return self.per_prompt.missing or f"samples file has no {phase} rows"

    def score(self, phase: str, name: str, *path: str) -> Optional[float]:
        """A number of the record's ``scores[phase][name][path...]``, or None."""
        return number(get(self.record.phase(phase), name, *path))

    def criterion(self, *path: str) -> Any:
        """``record.criteria[path...]`` (None where missing)."""
        return get(self.record.criteria, *path)

    @property
    def setting(self) -> tuple:
        """Records that may share a column: same model, loss mode, scorer and evaluation size."""
        return (self.model, self.loss_on, self.evaluation, self.scorer_key, str(self.eval_samples),
                str(self.max_new_tokens))


def scorer_config(rec: TrialRecord, evaluation: str) -> dict[str, Any]:
    """The scorer section of the record's config that scored ``evaluation``."""
    cfg = get(rec.config, "eval", "toxicity_scorer" if evaluation == "toxicity" else "harm_scorer")
    return cfg if isinstance(cfg, dict) else {}


def scorer_detail(views: Sequence[TrialView]) -> str:
    """The scorer label plus the model/variant its provenance names, e.g. ``harm_classifier [deberta...]``."""
    label = views[0].scorer if views else "unknown"
    details = set()
    for v in views:
        for phase in PHASES:
            prov = get(v.record.phase(phase), v.evaluation, "scorer")
            if isinstance(prov, dict):
                detail = prov.get("model") or prov.get("variant") or prov.get("attribute")
                if detail and str(detail) not in label:
                    details.add(str(detail))
    return label + (f" [{', '.join(sorted(details))}]" if details else "")


def _view(rec: TrialRecord) -> TrialView:
    cfg = rec.config
    d, a, ev_cfg = cfg.get("defence") or {}, cfg.get("attack") or {}, cfg.get("eval") or {}
    model = get(cfg, "model", "id") or (rec.model.id if rec.model else None) or "unknown"
    revision = get(cfg, "model", "revision")
    return TrialView(
        record=rec, trial_id=rec.trial_id, status=rec.status, seed=rec.seed, defence=d.get("name") or "unknown",
        defence_params={k: v for k, v in d.items() if k != "name"}, attack=a.get("name") or "unknown",
        attack_params={k: v for k, v in a.items() if k != "name"}, lr=number(a.get("lr")),
        samples=a.get("samples"), loss_on=str(a.get("loss_on") or "n/a"),
        model=f"{model}@{revision}" if revision else str(model), evaluation=rec.evaluation, scorer="",
        scorer_key=json.dumps(scorer_config(rec, rec.evaluation), sort_keys=True, default=str),
        harness=str(rec.environment.get("harness") or "unknown"), eval_samples=ev_cfg.get("samples"),
        max_new_tokens=a.get("max_new_tokens") or ev_cfg.get("max_new_tokens"))


def trial_views(records: Iterable[TrialRecord], samples: Optional[Mapping[str, Samples]] = None) -> list[TrialView]:
    """Records -> views with row (defence) and column (attack) labels, in trial-id order; ``samples``
    (``load_samples``) gives each view its per-prompt rows."""
    records = list(records)
    for rec in records:
        if not isinstance(rec, TrialRecord):
            raise TypeError(f"leaderboards read TrialRecord objects, not {type(rec).__name__} "
                            f"(read files with harness.lib.store.ResultStore)")
    views = [_view(r) for r in sorted(records, key=lambda r: r.trial_id)]
    if samples is not None:
        for v in views:
            v.per_prompt = samples.get(v.trial_id, Samples(missing=MISSING_NOT_LOADED))
    by_defence: dict[str, list[TrialView]] = defaultdict(list)
    by_attack: dict[str, list[TrialView]] = defaultdict(list)
    by_scorer: dict[tuple[str, str], list[TrialView]] = defaultdict(list)
    for v in views:
        by_defence[v.defence].append(v)
        by_attack[v.attack].append(v)
        by_scorer[(v.evaluation, scorer_config(v.record, v.evaluation).get("name") or "unknown")].append(v)
    for (ev, name), vs in by_scorer.items():  # scorer name + the parameters that differ between records
        params = [{k: x for k, x in scorer_config(v.record, ev).items() if k != "name"} for v in vs]
        keys = varying_keys(params)
        for v, p in zip(vs, params):
            v.scorer = params_label(name, p, keys)
    for name, vs in by_defence.items():
        keys = varying_keys(v.defence_params for v in vs)
        for v in vs:
            v.defence_label = params_label(name, v.defence_params, keys)
    for name, vs in by_attack.items():
        keys = varying_keys((v.attack_params for v in vs), skip=("lr", "samples", "loss_on"))
        for v in vs:
            base = f"{name} lr={compact(v.lr) if v.lr is not None else '?'} samples={v.samples}"
            extra = [f"{k}={compact(v.attack_params.get(k))}" for k in keys]
            v.attack_label = base + (f" ({', '.join(extra)})" if extra else "")
    return views


def defence_order(labels: Iterable[str]) -> list[str]:
    """The base model first, then defences alphabetically."""
    labels = sorted(set(labels))
    return [l for l in labels if l == BASE] + [l for l in labels if l != BASE]


def attack_sort_key(v: TrialView) -> tuple:
    return (v.attack, v.lr if v.lr is not None else math.inf, v.samples if isinstance(v.samples, int) else 0,
            v.attack_label)


def cross_domain(v: TrialView) -> bool:
    """Defence data and attack data from different domains (criteria.generalization, or the config
    for a record that failed before its criteria were written)."""
    g = v.criterion("generalization")
    if isinstance(g, dict) and "cross_domain" in g:
        return bool(g["cross_domain"])
    d_data = get(v.defence_params, "dataset", "name")
    a_data = get(v.attack_params, "dataset", "name")
    return bool(d_data) and bool(a_data) and d_data != a_data
