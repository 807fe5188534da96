"""Leaderboard figures (PNG, matplotlib Agg backend): harm against attack strength, harm per
category, weight distance.

- ``harm_vs_lr(records, out, samples)``: for each setting (model, attack loss mode, scorer) and
  evaluation (harmfulness, toxicity), post-attack mean score against the attack learning rate (log
  x axis), one line per defence, one panel per attack x sample count. Each point is the cell of the
  harm table: the mean per-prompt score with its 95% bootstrap CI as the error bar (no bar where
  the samples are missing). Defences differ in colour, marker and line style, and each is shifted
  a little along x (a fixed fraction of a decade) so that equal values do not hide each other; the
  dotted horizontal line of each defence is its pre-attack score.
- ``category_plots(tables, out)``: the per-category tables as grouped bars with CIs
  (``leaderboards.categories.category_plot``).
- ``weight_distance_plots(results_dir, out)``: the per-layer L2 weight distance between base,
  defended and attacked models, from any ``*weight_distance*.csv`` in the results folder (the
  records hold no weights). ``harness.lib.analysis.plot_weight_distance(df, png)`` draws the table
  that ``harness analyze weight-distance`` writes; a CSV of another shape (e.g. long: layer, pair,
  distance) gets a plain line plot per model pair against the layer index.

matplotlib, pandas and ``harness.lib.analysis`` (torch) are imported only when a figure is drawn.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from harness.api.record import TrialRecord
from leaderboards.categories import category_plot
from leaderboards.cells import Table, eval_groups
from leaderboards.tables import PRE, build_tables, score_cells
from leaderboards.views import BASE, EVALUATIONS, Samples, defence_order, load_samples, trial_views

log = logging.getLogger(__name__)

MARKERS = ("s", "o", "^", "v", "D", "P", "X", "<", ">", "h", "*", "p")
LINESTYLES = ("-", "--", "-.", (0, (3, 1, 1, 1, 1, 1)), (0, (5, 2)), (0, (1, 1)))
DODGE_DECADES = 0.025  # horizontal shift between neighbouring defences, in decades of the log axis


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "x"


def defence_style(i: int, label: str) -> dict:
    """Colour, marker and line style of the i-th defence (the base model: black squares, thick)."""
    if label == BASE:
        return dict(color="black", marker="s", ls="-", lw=2.4, ms=7)
    return dict(color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)], ls=LINESTYLES[i % len(LINESTYLES)], lw=1.5,
                ms=6)


def harm_vs_lr(records: Iterable[TrialRecord], out: str | Path,
               samples: Optional[Mapping[str, Samples]] = None) -> list[Path]:
    """One PNG per (setting, evaluation): ``<evaluation>_vs_lr.png`` (suffixed when several)."""
    views = [v for v in trial_views(records, samples if samples is not None else {}) if v.lr is not None]
    evs = [e for e in EVALUATIONS if any(v.evaluation == e for v in views)]
    evs += sorted({v.evaluation for v in views} - set(evs))
    out = Path(out)
    written: list[Path] = []
    for ev in evs:
        ev_groups = [g for g in eval_groups(views, ev) if any(v.score("post_attack", ev, "mean") is not None for v in g)]
        for n_group, group in enumerate(ev_groups, 1):
            _, cells = score_cells(group, ev)
            panels: dict[str, list] = defaultdict(list)
            for v in group:
                panels[re.sub(r" lr=\S+", "", v.attack_label)].append(v)
            plt = _pyplot()
            names = sorted(panels)
            fig, axes = plt.subplots(1, len(names), figsize=(max(7.0, 6.0 * len(names)), 4.8), squeeze=False)
            for ax, name in zip(axes[0], names):
                pv = panels[name]
                labels = defence_order(v.defence_label for v in pv)
                for i, label in enumerate(labels):
                    cols = sorted({(v.lr, v.attack_label) for v in pv if v.defence_label == label})
                    pts = [(lr, cells[(label, col)]) for lr, col in cols
                           if (label, col) in cells and cells[(label, col)].mean is not None]
                    if not pts:
                        continue
                    shift = 10 ** (DODGE_DECADES * (i - (len(labels) - 1) / 2))
                    xs = [lr * shift for lr, _ in pts]
                    means = [c.mean for _, c in pts]
                    ests = [c.estimate() for _, c in pts]
                    lo = [m - e.lo if e else 0.0 for m, e in zip(means, ests)]
                    hi = [e.hi - m if e else 0.0 for m, e in zip(means, ests)]
                    style = defence_style(i, label)
                    ax.errorbar(xs, means, yerr=[lo, hi], capsize=3, label=label, mfc="white" if i % 2 else None,
                                **style)
                    pre = cells.get((label, PRE))
                    if pre is not None and pre.mean is not None:
                        ax.axhline(pre.mean, color=style["color"], ls=":", lw=1)
                ax.set_xscale("log")
                ax.set_ylim(-0.03, 1.03)
                ax.set_xlabel("attack learning rate (points shifted slightly per defence)")
                ax.set_ylabel(f"post-attack {ev} (mean, 95% CI)")
                ax.set_title(name, fontsize=9)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7, loc="best")
            v0 = group[0]
            fig.suptitle(f"{ev} vs attack learning rate (dotted: before the attack; bars: 95% bootstrap CI)\n"
                         f"model {v0.model}, attack loss_on {v0.loss_on}, scorer {v0.scorer}", fontsize=8)
            fig.tight_layout()
            fname = f"{ev}_vs_lr.png" if len(ev_groups) == 1 else f"{ev}_vs_lr-{n_group}.png"
            path = out / fname
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def category_plots(tables: Sequence[Table], out: str | Path) -> list[Path]:
    """One PNG per per-category table: ``<evaluation>_by_category.png`` (suffixed when several)."""
    cat = [t for t in tables if t.kind == "categories"]
    written = []
    for i, t in enumerate(cat, 1):
        ev = t.title.split(" by ")[0].lower()
        same = [x for x in cat if x.title == t.title]
        name = f"{ev}_by_category.png" if len(same) == 1 else f"{ev}_by_category-{same.index(t) + 1}.png"
        written.append(category_plot(t, Path(out) / name))
    return written


def find_weight_distance_csvs(results_dir: str | Path) -> list[Path]:
    root = Path(results_dir)
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*weight_distance*.csv") if "checkpoints" not in p.relative_to(root).parts)


def _fallback_weight_plot(df, png: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    cols = [c.lower() for c in df.columns]
    layer_col = next((c for c, l in zip(df.columns, cols) if l in ("layer", "layer_index", "index")), None)
    dist_col = next((c for c, l in zip(df.columns, cols) if l in ("distance", "l2", "l2_distance", "value")), None)
    cat_cols = [c for c in df.columns if c not in (layer_col, dist_col) and df[c].dtype == object]
    if layer_col is not None and dist_col is not None and cat_cols:  # long: layer, pair/model, distance
        key = df[cat_cols].astype(str).agg(" / ".join, axis=1)
        for name in sorted(key.unique()):
            part = df[key == name]
            ax.plot(part[layer_col], part[dist_col], marker="o", label=name)
    else:  # wide: layer, one numeric column per model pair
        x = df[layer_col] if layer_col is not None else range(len(df))
        for c in df.columns:
            if c != layer_col and df[c].dtype != object:
                ax.plot(x, df[c], marker="o", label=str(c))
    ax.set_xlabel("layer")
    ax.set_ylabel("L2 weight distance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def analysis_table(df):
    """The table ``harness analyze weight-distance`` writes (first column: ``embeddings``, ``layer 0``,
    ..., ``total``; one column per compared model), indexed by that column; None for another shape."""
    if df.empty or not len(df.columns):
        return None
    first = df.columns[0]
    if not df[first].astype(str).str.match(r"layer \d+$").any():
        return None
    return df.set_index(first)


def weight_distance_plots(results_dir: str | Path, out: str | Path) -> list[Path]:
    import pandas as pd

    written: list[Path] = []
    csvs = find_weight_distance_csvs(results_dir)
    for csv in csvs:
        try:
            df = pd.read_csv(csv)
        except Exception as exc:
            log.warning("cannot read %s: %s", csv, exc)
            continue
        name = csv.stem if len(csvs) == 1 else _slug(str(csv.relative_to(results_dir).with_suffix("")))
        png = Path(out) / f"{name}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        table = analysis_table(df)
        try:
            if table is not None:
                from harness.lib import analysis  # imports torch

                analysis.plot_weight_distance(table, png)
            else:  # another shape (e.g. long: layer, pair, distance): one line per model pair
                _fallback_weight_plot(df, png)
        except Exception as exc:
            log.warning("cannot plot %s: %s", csv, exc)
            continue
        if png.exists():
            written.append(png)
    return written


def all_plots(records: Sequence[TrialRecord], results_dir: str | Path, out: str | Path,
              samples: Optional[Mapping[str, Samples]] = None) -> list[Path]:
    """Every figure: harm vs lr, harm per category, weight distance. ``samples``: the per-prompt
    scores (``views.load_samples``; read from ``results_dir`` when not given)."""
    out = Path(out)
    if out.exists():  # no stale figure of an earlier run
        for old in [*out.glob("*_vs_lr*.png"), *out.glob("*_by_category*.png"), *out.glob("*weight_distance*.png")]:
            old.unlink(missing_ok=True)
    if samples is None:
        samples = load_samples(records, results_dir)
    return (harm_vs_lr(records, out, samples) + category_plots(build_tables(records, samples), out)
            + weight_distance_plots(results_dir, out))
