"""Side-by-side generations: for a few prompts, the base model's answer, then each defence's answer
before the attack (defended) and after it (attacked), with their scores.

``side_by_side(views, k)`` picks, per setting and evaluation, the strongest attack cell (the last in
the tables' column order: highest learning rate, then most samples) and the lowest seed that the
base model (``none``) ran it with, then the ``k`` prompts every defence answered on which the
post-attack scores of the defences differ most (ties: evaluation order), so that the page shows
where defences disagree. The base answer is ``none``'s pre-attack answer. Pure: views in, text out.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Optional, Sequence

from leaderboards.cells import eval_groups
from leaderboards.views import BASE, EVALUATIONS, PromptRow, TrialView, attack_sort_key, defence_order

MAX_CHARS = 400


@dataclass
class Answer:
    text: str
    score: float
    label: Optional[str] = None

    def describe(self) -> str:
        return f"{self.score:.3f}" + (f", {self.label}" if self.label else "")


@dataclass
class PromptExample:
    prompt: str
    categories: tuple[str, ...]
    base: Optional[Answer]
    answers: list[tuple[str, Optional[Answer], Optional[Answer]]] = field(default_factory=list)
    """(defence label, defended answer before the attack, attacked answer)."""


@dataclass
class SideBySide:
    evaluation: str
    model: str
    scorer: str
    attack: str
    seed: str
    examples: list[PromptExample]


def _answer(row: Optional[PromptRow]) -> Optional[Answer]:
    return None if row is None else Answer(row.generation, row.score, row.label)


def side_by_side(views: Sequence[TrialView], k: int = 3) -> list[SideBySide]:
    out: list[SideBySide] = []
    evs = [e for e in EVALUATIONS if any(v.evaluation == e for v in views)]
    evs += sorted({v.evaluation for v in views} - set(evs))
    for ev in evs:
        for group in eval_groups(views, ev):
            with_rows = [v for v in group if v.rows("post_attack")]
            base_runs = [v for v in with_rows if v.defence == BASE]
            if not base_runs or k <= 0:
                continue
            attack = sorted(base_runs, key=attack_sort_key)[-1].attack_label
            seed = min((str(v.seed) for v in base_runs if v.attack_label == attack), key=lambda s: (len(s), s))
            chosen: dict[str, TrialView] = {}
            for v in with_rows:
                if v.attack_label == attack and str(v.seed) == seed:
                    chosen.setdefault(v.defence_label, v)
            labels = defence_order(chosen)
            post = {lab: {r.key: r for r in chosen[lab].rows("post_attack")} for lab in labels}
            pre = {lab: {r.key: r for r in (chosen[lab].rows("pre_attack") or [])} for lab in labels}
            base_view = next(chosen[lab] for lab in labels if chosen[lab].defence == BASE)
            order = [r.key for r in base_view.rows("post_attack")]
            common = [key for key in order if all(key in post[lab] for lab in labels)]
            spread = {key: max(post[lab][key].score for lab in labels) - min(post[lab][key].score for lab in labels)
                      for key in common}
            picked = sorted(common, key=lambda key: (-spread[key], order.index(key)))[:k]
            base_pre = pre[base_view.defence_label]
            examples = []
            for key in picked:
                first = post[labels[0]][key]
                ex = PromptExample(key[0], first.categories, _answer(base_pre.get(key)))
                for lab in labels:
                    if chosen[lab].defence == BASE:
                        continue
                    ex.answers.append((lab, _answer(pre[lab].get(key)), _answer(post[lab][key])))
                ex.answers.insert(0, (f"{base_view.defence_label} (base model)", _answer(base_pre.get(key)),
                                      _answer(post[base_view.defence_label][key])))
                examples.append(ex)
            v0 = group[0]
            out.append(SideBySide(ev, v0.model, v0.scorer, attack, seed, examples))
    return out


def _short(text: str) -> str:
    text = " ".join(text.split()) if text.strip() else "(empty)"
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + " […]"


def _intro(s: SideBySide) -> str:
    return (f"{s.evaluation}: model {s.model}, scorer {s.scorer}; attack {s.attack}, seed {s.seed}. First row: the "
            f"base model ({BASE}) before and after the attack. Defended: the defence's model before the attack; "
            f"attacked: after it. "
            f"Scores in parentheses (score, scorer label); answers cut at {MAX_CHARS} characters.")


def render_side_by_side_md(items: Sequence[SideBySide], title: str) -> str:
    def cell(a: Optional[Answer]) -> str:
        return "not recorded" if a is None else f"({a.describe()}) {_short(a.text)}".replace("|", "\\|")

    out = [f"# {title}", ""]
    for s in items:
        out += [f"## {s.evaluation} — {s.attack}", "", _intro(s), ""]
        for i, ex in enumerate(s.examples, 1):
            cats = f" [{', '.join(ex.categories)}]" if ex.categories else ""
            out += [f"### Prompt {i}{cats}", "", f"> {_short(ex.prompt)}", "",
                    "| defence | defended (before the attack) | attacked |", "|---|---|---|"]
            out += [f"| {lab} | {cell(d)} | {cell(a)} |" for lab, d, a in ex.answers]
            out.append("")
    if not items:
        out += ["No generations: no record of the base model with a samples file.", ""]
    return "\n".join(out)


def side_by_side_html_body(items: Sequence[SideBySide]) -> list[str]:
    def cell(a: Optional[Answer]) -> str:
        if a is None:
            return "<td>not recorded</td>"
        return f"<td><b>{html.escape(a.describe())}</b><br>{html.escape(_short(a.text))}</td>"

    out = []
    for s in items:
        out += [f"<h2>{html.escape(s.evaluation)} — {html.escape(s.attack)}</h2>", f"<p>{html.escape(_intro(s))}</p>"]
        for i, ex in enumerate(s.examples, 1):
            cats = f" [{', '.join(ex.categories)}]" if ex.categories else ""
            rows = "".join(f"<tr><th scope=\"row\">{html.escape(lab)}</th>{cell(d)}{cell(a)}</tr>"
                           for lab, d, a in ex.answers)
            out += [f"<h3>Prompt {i}{html.escape(cats)}</h3>", f"<blockquote>{html.escape(_short(ex.prompt))}</blockquote>",
                    "<table class=\"sortable\"><thead><tr><th>defence</th><th>defended (before the attack)</th>"
                    f"<th>attacked</th></tr></thead><tbody>{rows}</tbody></table>"]
    if not items:
        out.append("<p>No generations: no record of the base model with a samples file.</p>")
    return out
