"""Post-attack harm per harm category: a table per setting and a grouped bar plot.

The category of an evaluation prompt is what its dataset loader puts in ``Example.meta`` and the
pipeline writes into each samples row (``categories``, ``harness.pipeline.evaluation.
prompt_categories``): BeaverTails' flagged categories (a prompt may have several and then counts
in each), the source of the smoke prompts (``harmbench``, ``donotanswer/<file>``), DecodingTrust's
``type``. Rows without a category are left out of these tables (the caption says how many).

Cells pool every attack cell of the setting: a cluster of the bootstrap is one (attack, seed) run,
and the paired test against ``none`` pairs the same (attack, seed, prompt). Columns are ordered by
the number of prompts in the category (most first).
"""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path
from typing import Sequence

from leaderboards.cells import ScoreCell, Table, build_table, caption_tail, context, eval_groups, n_seeds, score_caption
from leaderboards.views import BASE, TrialView, defence_order, scorer_detail

PHASE = "post_attack"


def prompt_categories(views: Sequence[TrialView]) -> tuple[list[str], Counter, int]:
    """(categories ordered by prompt count, prompt count per category, prompts without any)."""
    per: Counter = Counter()
    seen: set = set()
    none = 0
    for v in views:
        for row in v.rows(PHASE) or ():
            if row.key in seen:
                continue
            seen.add(row.key)
            if not row.categories:
                none += 1
            for c in row.categories:
                per[c] += 1
    return sorted(per, key=lambda c: (-per[c], c)), per, none


def category_cells(group: Sequence[TrialView], evaluation: str, cats: Sequence[str]) -> dict[tuple[str, str], ScoreCell]:
    cells: dict[tuple[str, str], ScoreCell] = {}
    for v in group:
        for cat in cats:
            cells.setdefault((v.defence_label, cat), ScoreCell()).add(
                v, PHASE, evaluation, cluster=f"{v.attack_label} | seed {v.seed}",
                keep=lambda row, cat=cat: cat in row.categories)
    return cells


def category_tables(views: Sequence[TrialView], evaluation: str) -> list[Table]:
    """Defence x category: post-attack score pooled over the attack cells, per setting."""
    out = []
    for group in eval_groups(views, evaluation):
        cats, counts, uncategorised = prompt_categories(group)
        if not cats:
            continue
        rows = defence_order(v.defence_label for v in group)
        cells = category_cells(group, evaluation, cats)
        columns = [f"{c} ({counts[c]})" for c in cats]
        cells = {(r, f"{c} ({counts[c]})"): cell for (r, c), cell in cells.items()}
        ctx = context(group, scorer_detail(group))
        attacks = sorted({v.attack_label for v in group})
        left_out = f" {uncategorised} prompt(s) without a category are left out." if uncategorised else ""
        title = f"{evaluation.capitalize()} by category"
        caption = (f"{title}: mean post-attack {evaluation} per harm category of the evaluation prompts (column: "
                   f"category (prompts)), pooled over {len(attacks)} attack cell(s): {', '.join(attacks)}; a prompt "
                   f"with several categories counts in each.{left_out} Bootstrap clusters are (attack, seed) runs. "
                   + score_caption(cells.values(), evaluation).replace("(seed, prompt)", "(attack, seed, prompt)")
                   + " " + caption_tail(ctx, n_seeds(group)))
        out.append(build_table("categories", title, caption, ctx, rows, columns, cells))
    return out


def category_plot(table: Table, png: Path) -> Path:
    """Grouped horizontal bars: one group per category, one bar per defence, 95% CIs as error bars."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cells = table.cells
    cats = list(table.frame.columns)
    defences = list(table.frame.index)
    height = 0.8 / max(1, len(defences))
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.5 * len(cats) * max(1, len(defences)) * 0.45 + 1.5)))
    hatches = ["", "//", "..", "xx", "\\\\", "oo", "--", "++"]
    for i, d in enumerate(defences):
        part = cells[cells.defence == d].set_index("column").reindex(cats)
        ys = [j + (i - (len(defences) - 1) / 2) * height for j in range(len(cats))]
        means = part["mean"].to_numpy(dtype=float)
        lo = (means - part["ci_lo"].to_numpy(dtype=float)).clip(min=0)
        hi = (part["ci_hi"].to_numpy(dtype=float) - means).clip(min=0)
        ax.barh(ys, means, height=height, color="0.35" if d == BASE else f"C{i % 10}", hatch=hatches[i % len(hatches)], edgecolor="black",
                linewidth=0.4, label=d, xerr=[lo, hi], capsize=2, error_kw={"lw": 0.8})
    ax.set_yticks(range(len(cats)))
    ax.set_yticklabels(cats, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.set_xlabel(f"post-attack {table.title.split(' by ')[0].lower()} (mean, 95% CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("\n".join(textwrap.wrap(f"{table.title}: model {table.context['model']}, scorer "
                                         f"{table.context['scorer']}", 90)), fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
