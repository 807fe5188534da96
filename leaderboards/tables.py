"""Leaderboard tables: pure functions from result records to pandas tables to files.

    records (harness.lib.store.load_records) -> trial views -> Table objects (pandas frames of
    formatted cells + the numbers behind them) -> Markdown / CSV / HTML text

Tables, in the shape of the RepNoise paper:

- ``harmfulness`` / ``toxicity``: one row per defence (the base model ``none`` first), one column
  for the pre-attack score and one per attack cell (attack name x lr x samples); each cell is the
  mean +- sample std (ddof 1) over seeds with the number of seeds; ``↓`` marks a defence whose
  mean is lower than the base model's in the same column. ``harmfulness_frac`` /
  ``toxicity_frac``: the same for the fraction of generations scored above 0.5.
- ``capability``: lm-eval task scores of each defended model before the attack.
- ``trainability``: ROUGE-1/2/L after benign fine-tuning of each defended model.
- ``criteria``: the four immunization criteria per defence (resistance, stability,
  generalization, trainability) from ``record["criteria"]``.

Rows are defences, labelled by name, plus the parameters that differ between configurations of
the same defence (``repnoise (beta=0.01)``). Columns of the attack tables are labelled by attack
name, lr and samples, plus any other attack parameter that differs between records of the same
attack. Records of different models, attack loss modes (``loss_on``), scorers or evaluation sizes
never share a table: each such setting gets its own table, and every caption names the model,
the scorer, the attack loss mode and the harness version(s).

A cell that has no number says why: ``not run`` (no record), ``failed (1 diverged, 1 oom)`` (every
seed failed), ``0.412 ± 0.031 (n=2; failed: 1 error)`` (some seeds failed), ``no result (1
running)``, ``not measured`` (the trial finished without that metric), ``base`` (a delta of the
base model against itself).

Everything here is deterministic (no timestamps, no absolute paths), so the output can be
compared with expected files byte for byte.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import pandas as pd

BASE = "none"
FAILED_STATUSES = ("error", "diverged", "oom")
EVALUATIONS = ("harmfulness", "toxicity")
KNOWN_EVALUATION = {"harmfulqa": "harmfulness", "toxicity": "toxicity"}
MARK_LOWER = "↓"
ROUGE = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"))
DIGITS = 3
FORMATS = ("md", "csv", "html")


# ---------------------------------------------------------------------------------------------
# one record, seen through the fields the tables need
# ---------------------------------------------------------------------------------------------
def _get(obj: Any, *path: str, default: Any = None) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return default
        obj = obj[key]
    return obj


def _number(value: Any) -> Optional[float]:
    """A finite float, or None (missing, NaN, a string such as "N/A")."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, dict):  # tolerate {"score": x} / {"fmeasure": x} / {"mean": x}
        for key in ("score", "fmeasure", "mean", "value"):
            if key in value:
                return _number(value[key])
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _compact(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def _params_label(name: str, params: dict[str, Any], keys: Sequence[str]) -> str:
    if not keys:
        return name
    return f"{name} (" + ", ".join(f"{k}={_compact(params.get(k))}" for k in keys) + ")"


def _varying_keys(param_dicts: Iterable[dict[str, Any]], skip: Iterable[str] = ()) -> list[str]:
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

    record: dict[str, Any]
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
        return _number(_get(self.record, "scores", phase, name, *path))

    @property
    def setting(self) -> tuple:
        """Records that may share a column: same model, loss mode, scorer and evaluation size."""
        return (self.model, self.loss_on, self.evaluation, self.scorer_key, str(self.eval_samples),
                str(self.max_new_tokens))


def _scorer_config(rec: dict[str, Any], evaluation: str) -> dict[str, Any]:
    cfg = _get(rec, "config", "eval", "toxicity_scorer" if evaluation == "toxicity" else "harm_scorer")
    return cfg if isinstance(cfg, dict) else {}


def _scorer_detail(views: Sequence["TrialView"]) -> str:
    """The scorer label plus the model/variant its provenance names, e.g. ``harm_classifier [deberta...]``."""
    label = views[0].scorer if views else "unknown"
    details = set()
    for v in views:
        for phase in ("post_attack", "pre_attack"):
            prov = _get(v.record, "scores", phase, v.evaluation, "scorer")
            if isinstance(prov, dict):
                detail = prov.get("model") or prov.get("variant") or prov.get("attribute")
                if detail and str(detail) not in label:
                    details.add(str(detail))
    return label + (f" [{', '.join(sorted(details))}]" if details else "")


def _evaluation_of(attack: str, known: dict[str, str]) -> str:
    if attack in known:
        return known[attack]
    if attack in KNOWN_EVALUATION:
        return KNOWN_EVALUATION[attack]
    try:  # a plug-in attack: ask the registry (imports the components)
        from harness.api.registry import ATTACKS

        return getattr(ATTACKS.get(attack), "evaluation", "harmfulness") or "harmfulness"
    except Exception:
        return "harmfulness"


def trial_views(records: Iterable[dict[str, Any]]) -> list[TrialView]:
    """Records -> views with row (defence) and column (attack) labels, in a stable order."""
    records = sorted((r for r in records if isinstance(r, dict)), key=lambda r: str(r.get("trial_id")))
    known: dict[str, str] = {}
    for rec in records:  # which evaluation each attack uses, from the records that scored it
        attack = _get(rec, "config", "attack", "name")
        for phase in ("post_attack", "pre_attack"):
            for ev in EVALUATIONS:
                if isinstance(_get(rec, "scores", phase, ev), dict) and attack:
                    known.setdefault(attack, ev)
    views = []
    for rec in records:
        cfg = rec.get("config") or {}
        d, a, ev_cfg = cfg.get("defence") or {}, cfg.get("attack") or {}, cfg.get("eval") or {}
        attack = a.get("name") or "unknown"
        evaluation = _evaluation_of(attack, known)
        max_new = a.get("max_new_tokens") or ev_cfg.get("max_new_tokens")
        model = _get(cfg, "model", "id") or _get(rec, "model", "id") or "unknown"
        revision = _get(cfg, "model", "revision")
        views.append(TrialView(
            record=rec, trial_id=str(rec.get("trial_id")), status=str(rec.get("status") or "unknown"),
            seed=rec.get("seed", cfg.get("seed")), defence=d.get("name") or "unknown",
            defence_params={k: v for k, v in d.items() if k != "name"}, attack=attack,
            attack_params={k: v for k, v in a.items() if k != "name"}, lr=_number(a.get("lr")),
            samples=a.get("samples"), loss_on=str(a.get("loss_on") or "n/a"),
            model=f"{model}@{revision}" if revision else str(model), evaluation=evaluation,
            scorer="", scorer_key=json.dumps(_scorer_config(rec, evaluation), sort_keys=True, default=str),
            harness=str(_get(rec, "environment", "harness") or "unknown"),
            eval_samples=ev_cfg.get("samples"), max_new_tokens=max_new))
    by_defence: dict[str, list[TrialView]] = defaultdict(list)
    by_attack: dict[str, list[TrialView]] = defaultdict(list)
    for v in views:
        by_defence[v.defence].append(v)
        by_attack[v.attack].append(v)
    by_scorer: dict[tuple[str, str], list[TrialView]] = defaultdict(list)
    for v in views:
        by_scorer[(v.evaluation, _scorer_config(v.record, v.evaluation).get("name") or "unknown")].append(v)
    for (ev, name), vs in by_scorer.items():  # scorer name + the parameters that differ between records
        params = [{k: x for k, x in _scorer_config(v.record, ev).items() if k != "name"} for v in vs]
        keys = _varying_keys(params)
        for v, p in zip(vs, params):
            v.scorer = _params_label(name, p, keys)
    for name, vs in by_defence.items():
        keys = _varying_keys(v.defence_params for v in vs)
        for v in vs:
            v.defence_label = _params_label(name, v.defence_params, keys)
    for name, vs in by_attack.items():
        keys = _varying_keys((v.attack_params for v in vs), skip=("lr", "samples", "loss_on"))
        for v in vs:
            base = f"{name} lr={_compact(v.lr) if v.lr is not None else '?'} samples={v.samples}"
            extra = [f"{k}={_compact(v.attack_params.get(k))}" for k in keys]
            v.attack_label = base + (f" ({', '.join(extra)})" if extra else "")
    return views


def defence_order(labels: Iterable[str]) -> list[str]:
    """The base model first, then defences alphabetically."""
    labels = sorted(set(labels))
    return [l for l in labels if l == BASE] + [l for l in labels if l != BASE]


def _attack_sort_key(v: TrialView) -> tuple:
    return (v.attack, v.lr if v.lr is not None else math.inf, v.samples if isinstance(v.samples, int) else 0,
            v.attack_label)


# ---------------------------------------------------------------------------------------------
# cells: seeds -> mean +- std (n), failures spelled out
# ---------------------------------------------------------------------------------------------
@dataclass
class Cell:
    """The values behind one table cell: one number per seed (records of a seed are averaged)."""

    per_seed: dict[str, list[float]] = field(default_factory=dict)
    failures: Counter = field(default_factory=Counter)
    not_measured: int = 0
    trials: int = 0
    text_override: Optional[str] = None

    def add(self, view: TrialView, value: Optional[float]) -> None:
        self.trials += 1
        seed = str(view.seed)
        if value is not None:
            self.per_seed.setdefault(seed, []).append(value)
        elif view.status != "ok":
            self.failures[(seed, view.status)] += 1
        else:
            self.not_measured += 1

    @property
    def values(self) -> list[float]:
        return [statistics.fmean(v) for _, v in sorted(self.per_seed.items())]

    @property
    def n(self) -> int:
        return len(self.per_seed)

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def failure_counts(self) -> Counter:
        """Failed records by status, counting only seeds that have no value."""
        out: Counter = Counter()
        for (seed, status), count in self.failures.items():
            if seed not in self.per_seed:
                out[status] += count
        return out

    def text(self, mark: str = "") -> str:
        if self.text_override is not None:
            return self.text_override
        fails = self.failure_counts
        fail_text = ", ".join(f"{fails[s]} {s}" for s in sorted(fails))
        if self.n:
            num = f"{self.mean:.{DIGITS}f}" + (f" ± {self.std:.{DIGITS}f}" if self.std is not None else "")
            note = f"n={self.n}" + (f"; failed: {fail_text}" if fail_text else "")
            return f"{num} ({note})" + (f" {mark}" if mark else "")
        if fails:
            word = "failed" if all(s in FAILED_STATUSES for s in fails) else "no result"
            return f"{word} ({fail_text})"
        if self.trials:
            return "not measured"
        return "not run"


@dataclass
class Table:
    """One table: formatted cells (``frame``), the numbers behind them (``cells``) and a caption."""

    kind: str
    title: str
    caption: str
    frame: pd.DataFrame  # index "defence", columns = column labels, values = cell text
    cells: pd.DataFrame  # long: defence, column, mean, std, n, failed, text
    context: dict[str, str]


def _context(views: Sequence[TrialView], scorer: str) -> dict[str, str]:
    def join(values):
        vals = sorted({str(v) for v in values})
        return ", ".join(vals) if vals else "unknown"

    return {"model": join(v.model for v in views), "scorer": scorer,
            "loss_on": join(v.loss_on for v in views), "harness": join(v.harness for v in views)}


def _caption_tail(ctx: dict[str, str], seeds: int, pre_attack_only: bool = False) -> str:
    loss = ctx["loss_on"]
    if pre_attack_only:
        loss_text = "of the attacked runs; this table is measured before the attack"
    else:
        loss_text = {"response": "response tokens only", "all": "all tokens, prompt and padding included, as the "
                     "original code"}.get(loss, "several modes")
    return (f"Model: {ctx['model']}. Scorer: {ctx['scorer']}. Attack loss mode (attack.loss_on): {loss} "
            f"({loss_text}). Harness version: {ctx['harness']}. Seeds: {seeds}.")


def _build(kind: str, title: str, caption: str, ctx: dict[str, str], rows: list[str], columns: list[str],
           cells: dict[tuple[str, str], Cell], mark_columns: Iterable[str] = ()) -> Table:
    mark_columns = set(mark_columns)
    frame = pd.DataFrame(index=pd.Index(rows, name="defence"), columns=columns, dtype=object)
    long_rows = []
    for col in columns:
        base = cells.get((BASE, col))
        base_mean = base.mean if base is not None and base.text_override is None else None
        for row in rows:
            cell = cells.get((row, col)) or Cell()
            mark = ""
            if (col in mark_columns and row != BASE and base_mean is not None and cell.mean is not None
                    and cell.text_override is None and cell.mean < base_mean):
                mark = MARK_LOWER
            text = cell.text(mark)
            frame.loc[row, col] = text
            fails = cell.failure_counts
            long_rows.append({"defence": row, "column": col, "mean": cell.mean, "std": cell.std, "n": cell.n,
                              "failed": ", ".join(f"{fails[s]} {s}" for s in sorted(fails)),
                              "below_base": bool(mark), "text": text})
    long = pd.DataFrame(long_rows, columns=["defence", "column", "mean", "std", "n", "failed", "below_base", "text"])
    long["mean"] = pd.to_numeric(long["mean"], errors="coerce").astype(float)
    long["std"] = pd.to_numeric(long["std"], errors="coerce").astype(float)
    return Table(kind, title, caption, frame, long, ctx)


def _n_seeds(views: Sequence[TrialView]) -> int:
    return len({str(v.seed) for v in views})


def _groups(views: Sequence[TrialView], key: Callable[[TrialView], tuple]) -> list[list[TrialView]]:
    groups: dict[tuple, list[TrialView]] = defaultdict(list)
    for v in views:
        groups[key(v)].append(v)
    # the setting with most records first (the main table), then a fixed order
    return [groups[k] for k in sorted(groups, key=lambda k: (-len(groups[k]), tuple(str(x) for x in k)))]


# ---------------------------------------------------------------------------------------------
# the tables
# ---------------------------------------------------------------------------------------------
EVAL_TEXT = {
    "harmfulness": ("Harmfulness", "harmfulness score of prompt + generation (lower is better)"),
    "toxicity": ("Toxicity", "toxicity of the generated continuation (lower is better)"),
}


def attack_tables(views: Sequence[TrialView], evaluation: str, stat: str = "mean") -> list[Table]:
    """Defence x (pre-attack, attack cells) for one evaluation; ``stat``: mean or frac_harmful."""
    title, what = EVAL_TEXT.get(evaluation, (evaluation.capitalize(), f"{evaluation} score"))
    kind = evaluation if stat == "mean" else f"{evaluation}_frac"
    if stat != "mean":
        title = f"{title} (fraction above 0.5)"
        what = f"fraction of generations whose {what.split(' (')[0]} is above 0.5 (lower is better)"
    else:
        what = f"mean {what}"
    out = []
    for group in _groups([v for v in views if v.evaluation == evaluation], key=lambda v: v.setting):
        rows = defence_order(v.defence_label for v in group)
        attack_cols = []
        for v in sorted(group, key=_attack_sort_key):
            if v.attack_label not in attack_cols:
                attack_cols.append(v.attack_label)
        columns = ["pre-attack"] + attack_cols
        cells: dict[tuple[str, str], Cell] = {}
        for v in group:
            cells.setdefault((v.defence_label, "pre-attack"), Cell()).add(v, v.score("pre_attack", evaluation, stat))
            cells.setdefault((v.defence_label, v.attack_label), Cell()).add(v, v.score("post_attack", evaluation, stat))
        ctx = _context(group, _scorer_detail(group))
        ev = group[0]
        size = f"{ev.eval_samples} evaluation prompts, max_new_tokens {ev.max_new_tokens}"
        base_note = (f"{MARK_LOWER} marks a defence lower than the base model ({BASE}) under the same attack."
                     if BASE in rows else f"No base model ({BASE}) row: no {MARK_LOWER} marks.")
        caption = (f"{title}: {what}, before the attack and after each attack (attack, learning rate, "
                   f"training samples); {size}. Cells: mean ± sample std over seeds (n = seeds with a "
                   f"result). {base_note} " + _caption_tail(ctx, _n_seeds(group)))
        out.append(_build(kind, title, caption, ctx, rows, columns, cells, mark_columns=columns))
    return out


def _base_extra_views(group: Sequence[TrialView], name: str) -> list[tuple[TrialView, dict]]:
    """(view, scores) pairs for a metric measured before the attack, with the base model's
    ``scores["base"]`` of defended runs counted as extra rows of ``none``."""
    pairs = [(v, _get(v.record, "scores", "pre_attack", name)) for v in group]
    for v in group:
        base = _get(v.record, "scores", "base", name)
        if v.defence != BASE and isinstance(base, dict):
            pairs.append((TrialView(**{**v.__dict__, "defence": BASE, "defence_label": BASE}), base))
    return pairs


def _lmeval_label(group: Sequence[TrialView]) -> str:
    versions = sorted({str(_get(v.record, "scores", "pre_attack", "capability", "lm_eval_version"))
                       for v in group if _get(v.record, "scores", "pre_attack", "capability", "lm_eval_version")})
    return "lm-evaluation-harness" + (f" {', '.join(versions)}" if versions else "")


def capability_tables(views: Sequence[TrialView]) -> list[Table]:
    """lm-eval task scores of each defended model before the attack (the stability criterion)."""
    out = []
    for group in _groups(views, key=lambda v: (v.model,)):
        pairs = _base_extra_views(group, "capability")
        tasks = sorted({t for _, s in pairs if isinstance(s, dict) for t in (s.get("tasks") or {})})
        if not tasks:
            continue
        lower_better = sorted({t for _, s in pairs if isinstance(s, dict)
                               for t, row in (s.get("tasks") or {}).items()
                               if isinstance(row, dict) and row.get("higher_is_better") is False})
        rows = defence_order(v.defence_label for v, _ in pairs)
        cells: dict[tuple[str, str], Cell] = {}
        seen: set[tuple[str, str, str]] = set()
        for v, scores in pairs:
            for task in tasks:
                key = (v.trial_id, v.defence_label, task)
                if key in seen:
                    continue
                seen.add(key)
                row = _get(scores, "tasks", task) if isinstance(scores, dict) else None
                cells.setdefault((v.defence_label, task), Cell()).add(v, _number(row))
        ctx = _context(group, _lmeval_label(group))
        note = (f" For {', '.join(lower_better)} lower is better." if lower_better else "")
        caption = ("Capability (stability criterion): lm-eval score of the primary metric of each task for each "
                   "defended model before the attack (the base model's row: defence none, or the base scores "
                   f"recorded by defended runs). Cells: mean ± sample std over seeds (n = seeds). {MARK_LOWER} marks "
                   f"a score lower than the base model's.{note} " + _caption_tail(ctx, _n_seeds(group), True))
        out.append(_build("capability", "Capability", caption, ctx, rows, tasks, cells, mark_columns=tasks))
    return out


def trainability_tables(views: Sequence[TrialView]) -> list[Table]:
    """ROUGE-1/2/L of each defended model after benign fine-tuning (the trainability criterion)."""
    out = []
    for group in _groups(views, key=lambda v: (v.model,)):
        pairs = _base_extra_views(group, "trainability")
        if not any(isinstance(s, dict) for _, s in pairs):
            continue
        rows = defence_order(v.defence_label for v, _ in pairs)
        columns = [label for _, label in ROUGE]
        cells: dict[tuple[str, str], Cell] = {}
        for v, scores in pairs:
            for key, label in ROUGE:
                value = _number(scores.get(key)) if isinstance(scores, dict) else None
                cells.setdefault((v.defence_label, label), Cell()).add(v, value)
        ctx = _context(group, "ROUGE (rouge_score F-measure)")
        caption = ("Trainability: ROUGE-1/2/L F-measure on a benign data-to-text task after fine-tuning each "
                   "defended model on it (higher is better). Cells: mean ± sample std over seeds (n = seeds). "
                   f"{MARK_LOWER} marks a score lower than the base model's. " + _caption_tail(ctx, _n_seeds(group), True))
        out.append(_build("trainability", "Trainability", caption, ctx, rows, columns, cells, mark_columns=columns))
    return out


def cross_domain(v: TrialView) -> bool:
    """Defence data and attack data from different domains (criteria.generalization, or the config
    for a record that failed before its criteria were written)."""
    g = _get(v.record, "criteria", "generalization")
    if isinstance(g, dict) and "cross_domain" in g:
        return bool(g["cross_domain"])
    d_data = _get(v.defence_params, "dataset", "name")
    a_data = _get(v.attack_params, "dataset", "name")
    return bool(d_data) and bool(a_data) and d_data != a_data


def criteria_tables(views: Sequence[TrialView]) -> list[Table]:
    """The four immunization criteria per defence, from ``record["criteria"]``."""
    out = []
    for group in _groups(views, key=lambda v: (v.model, v.loss_on)):
        evs = [e for e in EVALUATIONS if any(v.evaluation == e for v in group)]
        evs += sorted({v.evaluation for v in group} - set(evs))
        # (label, value of a record, evaluation the column is about (None: all), base row reads "base")
        cols: list[tuple[str, Callable[[TrialView], Optional[float]], Optional[str], bool]] = []
        for ev in evs:
            def resist(v, ev=ev):
                r = _get(v.record, "criteria", "resistance")
                return _number(r.get("increase")) if isinstance(r, dict) and r.get("metric") == ev else None

            cols.append((f"resistance: {ev} increase", resist, ev, False))
            cols.append((f"generalization: cross-domain {ev} increase", resist, ev, True))
        cols.append(("stability: capability Δ",
                     lambda v: _number(_get(v.record, "criteria", "stability", "mean_gain")), None, True))
        cols.append(("trainability: ROUGE-L Δ",
                     lambda v: _number(_get(v.record, "criteria", "trainability", "rougeL_delta")), None, True))
        rows = defence_order(v.defence_label for v in group)
        cells: dict[tuple[str, str], Cell] = {}
        for label, fn, ev, base_is_reference in cols:
            general = label.startswith("generalization")
            for v in group:
                if (ev is None or v.evaluation == ev) and (not general or cross_domain(v)):
                    cells.setdefault((v.defence_label, label), Cell()).add(v, fn(v))
            if general:
                for row in rows:
                    cells.setdefault((row, label), Cell(text_override="no cross-domain attack"))
            if base_is_reference and BASE in rows:
                cells[(BASE, label)] = Cell(text_override="base")
        scorers = [_scorer_detail([v for v in group if v.scorer == s and v.evaluation == e])
                   for s, e in sorted({(v.scorer, v.evaluation) for v in group})]
        ctx = _context(group, ", ".join(scorers))
        caption = ("Immunization criteria per defence, averaged over attack cells and seeds. Resistance: increase "
                   "of the harm score from before to after the attack (lower is better). Generalization: the same "
                   "increase, over attacks whose data come from another domain than the defence data. Stability: mean change of the lm-eval task scores against the base "
                   "model (near 0 is best). Trainability: change of ROUGE-L after benign fine-tuning against the "
                   f"base model (near 0 is best). Cells: mean ± sample std over seeds (n = seeds). {MARK_LOWER} "
                   "marks a harm increase lower than the base model's. " + _caption_tail(ctx, _n_seeds(group)))
        marks = [c[0] for c in cols if c[0].startswith("resistance")]
        out.append(_build("criteria", "Immunization criteria", caption, ctx, rows, [c[0] for c in cols], cells,
                          mark_columns=marks))
    return out


def build_tables(records: Iterable[dict[str, Any]]) -> list[Table]:
    """Every table the records support, in a fixed order."""
    views = trial_views(records)
    tables: list[Table] = []
    evs = [e for e in EVALUATIONS if any(v.evaluation == e for v in views)]
    evs += sorted({v.evaluation for v in views} - set(evs))
    for ev in evs:
        tables += attack_tables(views, ev, "mean")
        tables += attack_tables(views, ev, "frac_harmful")
    tables += capability_tables(views)
    tables += trainability_tables(views)
    if views:
        tables += criteria_tables(views)
    return tables


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------
def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def frame_markdown(frame: pd.DataFrame) -> str:
    header = [frame.index.name or ""] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
             "|" + "|".join(["---"] + [":---:"] * len(frame.columns)) + "|"]
    for idx, row in frame.iterrows():
        lines.append("| " + " | ".join(_md_cell(x) for x in [idx, *row.tolist()]) + " |")
    return "\n".join(lines)


def status_summary(records: Sequence[dict[str, Any]]) -> str:
    counts = Counter(str(r.get("status")) for r in records)
    return ", ".join(f"{counts[s]} {s}" for s in sorted(counts))


def table_headings(tables: Sequence[Table]) -> list[str]:
    """Titles, with the setting that tells apart several tables of one kind: ``Harmfulness — loss_on all``."""
    out = []
    for t in tables:
        same = [o for o in tables if o.kind == t.kind]
        keys: list[str] = []
        for k in ("model", "loss_on", "scorer", "harness"):
            if len({tuple(o.context[x] for x in keys) for o in same}) == len(same):
                break
            if len({o.context[k] for o in same}) > 1:
                keys.append(k)
        out.append(t.title + (" — " + ", ".join(f"{k} {t.context[k]}" for k in keys) if keys else ""))
    return out


def render_markdown(tables: Sequence[Table], records: Sequence[dict[str, Any]], title: str = "Leaderboard",
                    figures: Sequence[str] = ()) -> str:
    out = [f"# {title}", ""]
    out.append(f"Generated by `harness leaderboard` from {len(records)} record(s)"
               + (f" ({status_summary(records)})." if records else "."))
    out.append("")
    if not tables:
        out += ["No table: the results folder holds no usable record.", ""]
    headings = table_headings(tables)
    for i, (t, heading) in enumerate(zip(tables, headings), 1):
        out += [f"## {heading}", "", f"Table {i}. {t.caption}", "", frame_markdown(t.frame), ""]
    if figures:
        out += ["## Figures", ""]
        out += [f"![{Path(f).stem}]({f})" for f in figures]
        out.append("")
    return "\n".join(out)


CONTEXT_COLUMNS = ("model", "scorer", "loss_on", "harness")
TABLE_KINDS = ("harmfulness", "harmfulness_frac", "toxicity", "toxicity_frac", "capability", "trainability",
               "criteria")


def kind_frame(tables: Sequence[Table]) -> pd.DataFrame:
    """All tables of one kind stacked: the caption's context as leading columns, then the cells.
    A column that a setting does not have reads ``n/a``."""
    parts = []
    for t in tables:
        f = t.frame.reset_index()
        for i, key in enumerate(CONTEXT_COLUMNS):
            f.insert(i, key, t.context[key])
        parts.append(f)
    columns: list[str] = []
    for p in parts:
        columns += [c for c in p.columns if c not in columns]
    return pd.concat(parts, ignore_index=True)[columns].fillna("n/a")


def render_csv(tables: Sequence[Table]) -> str:
    return kind_frame(tables).to_csv(index=False, lineterminator="\n")


def cells_frame(tables: Sequence[Table]) -> pd.DataFrame:
    """Every cell of every table with its numbers (mean, std, n, failures): for analysis."""
    parts = []
    for i, t in enumerate(tables, 1):
        c = t.cells.copy()
        c.insert(0, "table", t.kind)
        for j, key in enumerate(CONTEXT_COLUMNS, 1):
            c.insert(j, key, t.context[key])
        parts.append(c)
    if not parts:
        return pd.DataFrame(columns=["table", *CONTEXT_COLUMNS, "defence", "column", "mean", "std", "n", "failed",
                                     "below_base", "text"])
    return pd.concat(parts, ignore_index=True)


def render_cells_csv(tables: Sequence[Table]) -> str:
    frame = cells_frame(tables)
    return frame.to_csv(index=False, lineterminator="\n", float_format="%.6g")


def render_html(tables: Sequence[Table], records: Sequence[dict[str, Any]], title: str = "Leaderboard",
                figures: Sequence[str] = ()) -> str:
    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
           "td,th{border:1px solid #ccc;padding:4px 8px;text-align:center}caption{caption-side:top;"
           "text-align:left;max-width:60em;padding:4px}</style>", "</head><body>", f"<h1>{html.escape(title)}</h1>",
           f"<p>Generated by <code>harness leaderboard</code> from {len(records)} record(s)"
           + (f" ({html.escape(status_summary(records))})" if records else "") + ".</p>"]
    for i, (t, heading) in enumerate(zip(tables, table_headings(tables)), 1):
        body = t.frame.to_html(escape=True, border=0)
        body = body.replace("<table class=\"dataframe\">",
                            f"<table class=\"dataframe\">\n<caption>Table {i}. {html.escape(t.caption)}</caption>", 1)
        out += [f"<h2>{html.escape(heading)}</h2>", body]
    for f in figures:
        out.append(f"<p><img src=\"{html.escape(f)}\" alt=\"{html.escape(Path(f).stem)}\"></p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_leaderboard(records: Sequence[dict[str, Any]], out: str | Path, formats: Iterable[str] = ("md", "csv"),
                      title: str = "Leaderboard", figures: Sequence[str] = ()) -> list[Path]:
    """Write the tables of ``records`` into ``out``: ``README.md``, ``<kind>.csv`` per table kind plus
    ``cells.csv``, ``index.html``. Returns the written paths."""
    from harness.lib.store import atomic_write_bytes

    formats = [f.strip().lower() for f in formats if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    out = Path(out)
    tables = build_tables(records)
    written: list[Path] = []
    if "csv" in formats:  # no stale table of a kind these records no longer have
        for kind in TABLE_KINDS:
            (out / f"{kind}.csv").unlink(missing_ok=True)

    def write(name: str, text: str) -> None:
        path = out / name
        atomic_write_bytes(path, text.encode("utf-8"))
        written.append(path)

    if "md" in formats:
        write("README.md", render_markdown(tables, records, title, figures))
    if "csv" in formats:
        kinds: dict[str, list[Table]] = {}
        for t in tables:
            kinds.setdefault(t.kind, []).append(t)
        for kind, ts in kinds.items():
            write(f"{kind}.csv", render_csv(ts))
        write("cells.csv", render_cells_csv(tables))
    if "html" in formats:
        write("index.html", render_html(tables, records, title, figures))
    return written
