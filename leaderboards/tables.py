"""Leaderboard tables: pure functions from ``TrialRecord``s to ``Table``s.

    records (harness.lib.store.ResultStore.records) -> trial views (views.py) -> cells (cells.py)
    -> Table objects (this module) -> Markdown / CSV / HTML text (render.py)

Tables, in the shape of the RepNoise paper:

- ``harmfulness`` / ``toxicity``: one row per defence (the base model ``none`` first), one column
  for the pre-attack score and one per attack cell (attack name x lr x samples); each cell is the
  mean +- sample std (ddof 1) over seeds with the number of seeds; ``↓`` marks a defence whose
  mean is lower than the base model's in the same column. ``harmfulness_frac`` /
  ``toxicity_frac``: the same for the fraction of generations scored above 0.5.
- ``capability``: lm-eval task scores of each defended model before the attack.
- ``trainability``: ROUGE-1/2/L after benign fine-tuning of each defended model.
- ``criteria``: the four immunization criteria per defence (resistance, stability,
  generalization, trainability) from ``record.criteria``.

Records of different models, attack loss modes (``loss_on``), scorers or evaluation sizes never
share a table: each such setting gets its own table, and every caption names the model, the
scorer, the attack loss mode and the harness version(s). Everything here is deterministic (no
timestamps, no absolute paths), so the output can be compared with expected files byte for byte.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, Sequence

from harness.api.record import TrialRecord
from leaderboards.cells import MARK_LOWER, Cell, Table, build_table, caption_tail, context, groups, n_seeds
from leaderboards.views import (BASE, EVALUATIONS, TrialView, attack_sort_key, cross_domain, defence_order, get,
                                number, scorer_detail, trial_views)

__all__ = ["BASE", "EVALUATIONS", "MARK_LOWER", "ROUGE", "TABLE_KINDS", "Table", "attack_tables", "build_tables",
           "capability_tables", "criteria_tables", "trainability_tables"]

ROUGE = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"))
TABLE_KINDS = ("harmfulness", "harmfulness_frac", "toxicity", "toxicity_frac", "capability", "trainability",
               "criteria")
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
    for group in groups([v for v in views if v.evaluation == evaluation], key=lambda v: v.setting):
        rows = defence_order(v.defence_label for v in group)
        attack_cols = []
        for v in sorted(group, key=attack_sort_key):
            if v.attack_label not in attack_cols:
                attack_cols.append(v.attack_label)
        columns = ["pre-attack"] + attack_cols
        cells: dict[tuple[str, str], Cell] = {}
        for v in group:
            cells.setdefault((v.defence_label, "pre-attack"), Cell()).add(v, v.score("pre_attack", evaluation, stat))
            cells.setdefault((v.defence_label, v.attack_label), Cell()).add(v, v.score("post_attack", evaluation, stat))
        ctx = context(group, scorer_detail(group))
        ev = group[0]
        size = f"{ev.eval_samples} evaluation prompts, max_new_tokens {ev.max_new_tokens}"
        base_note = (f"{MARK_LOWER} marks a defence lower than the base model ({BASE}) under the same attack."
                     if BASE in rows else f"No base model ({BASE}) row: no {MARK_LOWER} marks.")
        caption = (f"{title}: {what}, before the attack and after each attack (attack, learning rate, "
                   f"training samples); {size}. Cells: mean ± sample std over seeds (n = seeds with a "
                   f"result). {base_note} " + caption_tail(ctx, n_seeds(group)))
        out.append(build_table(kind, title, caption, ctx, rows, columns, cells, mark_columns=columns))
    return out


def _base_extra_views(group: Sequence[TrialView], name: str) -> list[tuple[TrialView, Any]]:
    """(view, scores) pairs for a metric measured before the attack, with the base model's
    ``scores.base`` of defended runs counted as extra rows of ``none``."""
    pairs = [(v, v.record.phase("pre_attack").get(name)) for v in group]
    for v in group:
        base = v.record.phase("base").get(name)
        if v.defence != BASE and isinstance(base, dict):
            pairs.append((dataclasses.replace(v, defence=BASE, defence_label=BASE), base))
    return pairs


def _lmeval_label(group: Sequence[TrialView]) -> str:
    versions = sorted({str(get(v.record.phase("pre_attack"), "capability", "lm_eval_version")) for v in group
                       if get(v.record.phase("pre_attack"), "capability", "lm_eval_version")})
    return "lm-evaluation-harness" + (f" {', '.join(versions)}" if versions else "")


def capability_tables(views: Sequence[TrialView]) -> list[Table]:
    """lm-eval task scores of each defended model before the attack (the stability criterion)."""
    out = []
    for group in groups(views, key=lambda v: (v.model,)):
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
                row = get(scores, "tasks", task) if isinstance(scores, dict) else None
                cells.setdefault((v.defence_label, task), Cell()).add(v, number(row))
        ctx = context(group, _lmeval_label(group))
        note = (f" For {', '.join(lower_better)} lower is better." if lower_better else "")
        caption = ("Capability (stability criterion): lm-eval score of the primary metric of each task for each "
                   "defended model before the attack (the base model's row: defence none, or the base scores "
                   f"recorded by defended runs). Cells: mean ± sample std over seeds (n = seeds). {MARK_LOWER} marks "
                   f"a score lower than the base model's.{note} " + caption_tail(ctx, n_seeds(group), True))
        out.append(build_table("capability", "Capability", caption, ctx, rows, tasks, cells, mark_columns=tasks))
    return out


def trainability_tables(views: Sequence[TrialView]) -> list[Table]:
    """ROUGE-1/2/L of each defended model after benign fine-tuning (the trainability criterion)."""
    out = []
    for group in groups(views, key=lambda v: (v.model,)):
        pairs = _base_extra_views(group, "trainability")
        if not any(isinstance(s, dict) for _, s in pairs):
            continue
        rows = defence_order(v.defence_label for v, _ in pairs)
        columns = [label for _, label in ROUGE]
        cells: dict[tuple[str, str], Cell] = {}
        for v, scores in pairs:
            for key, label in ROUGE:
                value = number(scores.get(key)) if isinstance(scores, dict) else None
                cells.setdefault((v.defence_label, label), Cell()).add(v, value)
        ctx = context(group, "ROUGE (rouge_score F-measure)")
        caption = ("Trainability: ROUGE-1/2/L F-measure on a benign data-to-text task after fine-tuning each "
                   "defended model on it (higher is better). Cells: mean ± sample std over seeds (n = seeds). "
                   f"{MARK_LOWER} marks a score lower than the base model's. "
                   + caption_tail(ctx, n_seeds(group), True))
        out.append(build_table("trainability", "Trainability", caption, ctx, rows, columns, cells,
                               mark_columns=columns))
    return out


# (column label, value of a record, evaluation the column is about (None: all), the base row reads "base")
CriterionColumn = tuple[str, Callable[[TrialView], Optional[float]], Optional[str], bool]


def _criteria_columns(evaluations: Sequence[str]) -> list[CriterionColumn]:
    cols: list[CriterionColumn] = []
    for ev in evaluations:
        def resist(v: TrialView, ev: str = ev) -> Optional[float]:
            r = v.criterion("resistance")
            return number(r.get("increase")) if isinstance(r, dict) and r.get("metric") == ev else None

        cols.append((f"resistance: {ev} increase", resist, ev, False))
        cols.append((f"generalization: cross-domain {ev} increase", resist, ev, True))
    cols.append(("stability: capability Δ", lambda v: number(v.criterion("stability", "mean_gain")), None, True))
    cols.append(("trainability: ROUGE-L Δ", lambda v: number(v.criterion("trainability", "rougeL_delta")), None,
                 True))
    return cols


def criteria_tables(views: Sequence[TrialView]) -> list[Table]:
    """The four immunization criteria per defence, from ``record.criteria``."""
    out = []
    for group in groups(views, key=lambda v: (v.model, v.loss_on)):
        evs = [e for e in EVALUATIONS if any(v.evaluation == e for v in group)]
        evs += sorted({v.evaluation for v in group} - set(evs))
        cols = _criteria_columns(evs)
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
        scorers = [scorer_detail([v for v in group if v.scorer == s and v.evaluation == e])
                   for s, e in sorted({(v.scorer, v.evaluation) for v in group})]
        ctx = context(group, ", ".join(scorers))
        caption = ("Immunization criteria per defence, averaged over attack cells and seeds. Resistance: increase "
                   "of the harm score from before to after the attack (lower is better). Generalization: the same "
                   "increase, over attacks whose data come from another domain than the defence data. Stability: "
                   "mean change of the lm-eval task scores against the base "
                   "model (near 0 is best). Trainability: change of ROUGE-L after benign fine-tuning against the "
                   f"base model (near 0 is best). Cells: mean ± sample std over seeds (n = seeds). {MARK_LOWER} "
                   "marks a harm increase lower than the base model's. " + caption_tail(ctx, n_seeds(group)))
        marks = [c[0] for c in cols if c[0].startswith("resistance")]
        out.append(build_table("criteria", "Immunization criteria", caption, ctx, rows, [c[0] for c in cols], cells,
                               mark_columns=marks))
    return out


def build_tables(records: Iterable[TrialRecord]) -> list[Table]:
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
