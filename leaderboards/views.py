"""One ``TrialRecord`` seen through the fields that place it in a table: ``TrialView``.

``trial_views(records)`` labels every record with its row (the defence, plus the parameters that
differ between configurations of the same defence: ``repnoise (beta=0.01)``), its column (attack
name, lr and samples, plus any other attack parameter that differs between records of the same
attack) and its setting (model, attack loss mode, evaluation, scorer, evaluation size): records of
different settings never share a table. Which evaluation a record headlines (harmfulness,
toxicity, ...) is the record's own ``evaluation`` field.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

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


def trial_views(records: Iterable[TrialRecord]) -> list[TrialView]:
    """Records -> views with row (defence) and column (attack) labels, in trial-id order."""
    records = list(records)
    for rec in records:
        if not isinstance(rec, TrialRecord):
            raise TypeError(f"leaderboards read TrialRecord objects, not {type(rec).__name__} "
                            f"(read files with harness.lib.store.ResultStore)")
    views = [_view(r) for r in sorted(records, key=lambda r: r.trial_id)]
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
