"""Leaderboard figures (PNG, matplotlib Agg backend): harm against attack strength, weight distance.

- ``harm_vs_lr(records, out)``: for each setting (model, attack loss mode, scorer) and evaluation
  (harmfulness, toxicity), post-attack mean score against the attack learning rate (log x axis),
  one line per defence with error bars (sample std over seeds), one panel per attack x sample
  count; the dotted line of each defence is its pre-attack score.
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
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from harness.api.record import TrialRecord
from leaderboards.views import BASE, EVALUATIONS, defence_order, trial_views

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "x"


def harm_vs_lr(records: Iterable[TrialRecord], out: str | Path) -> list[Path]:
    """One PNG per (setting, evaluation): ``<evaluation>_vs_lr.png`` (suffixed when several)."""
    views = [v for v in trial_views(records) if v.lr is not None]
    groups: dict[tuple, list] = defaultdict(list)
    for v in views:
        groups[(v.evaluation, v.setting)].append(v)
    per_eval: dict[str, int] = defaultdict(int)
    for ev, _ in groups:
        per_eval[ev] += 1
    out = Path(out)
    written: list[Path] = []
    seen: dict[str, int] = defaultdict(int)
    # the same order as the tables: evaluation, then the setting with most records first
    order = sorted(groups, key=lambda k: (EVALUATIONS.index(k[0]) if k[0] in EVALUATIONS else 99, k[0],
                                          -len(groups[k]), tuple(str(x) for x in k[1])))
    for ev, setting in order:
        group = groups[(ev, setting)]
        panels: dict[str, list] = defaultdict(list)
        for v in group:
            panels[re.sub(r" lr=\S+", "", v.attack_label)].append(v)
        if not any(v.score("post_attack", ev, "mean") is not None for v in group):
            continue
        plt = _pyplot()
        names = sorted(panels)
        fig, axes = plt.subplots(1, len(names), figsize=(max(6.5, 5.5 * len(names)), 4.6), squeeze=False)
        for ax, name in zip(axes[0], names):
            pv = panels[name]
            for i, label in enumerate(defence_order(v.defence_label for v in pv)):
                rows = [v for v in pv if v.defence_label == label]
                by_lr: dict[float, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
                pre: dict[str, list[float]] = defaultdict(list)
                for v in rows:
                    post = v.score("post_attack", ev, "mean")
                    if post is not None:
                        by_lr[v.lr][str(v.seed)].append(post)
                    p = v.score("pre_attack", ev, "mean")
                    if p is not None:
                        pre[str(v.seed)].append(p)
                lrs = sorted(by_lr)
                if not lrs:
                    continue
                seed_means = [[statistics.fmean(x) for x in by_lr[lr].values()] for lr in lrs]
                means = [statistics.fmean(s) for s in seed_means]
                stds = [statistics.stdev(s) if len(s) > 1 else 0.0 for s in seed_means]
                color = f"C{i % 10}"
                style = dict(lw=2.5, marker="s") if label == BASE else dict(lw=1.5, marker="o")
                ax.errorbar(lrs, means, yerr=stds, color=color, capsize=3, label=label, **style)
                if pre:
                    ax.axhline(statistics.fmean(statistics.fmean(x) for x in pre.values()), color=color, ls=":", lw=1)
            ax.set_xscale("log")
            ax.set_xlabel("attack learning rate")
            ax.set_ylabel(f"post-attack {ev} (mean)")
            ax.set_title(name, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        v0 = group[0]
        fig.suptitle(f"{ev} vs attack learning rate (dotted: before the attack)\nmodel {v0.model}, "
                     f"attack loss_on {v0.loss_on}, scorer {v0.scorer}", fontsize=8)
        fig.tight_layout()
        seen[ev] += 1
        name = f"{ev}_vs_lr.png" if per_eval[ev] == 1 else f"{ev}_vs_lr-{seen[ev]}.png"
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
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


def all_plots(records: Sequence[TrialRecord], results_dir: str | Path, out: str | Path) -> list[Path]:
    out = Path(out)
    if out.exists():  # no stale figure of an earlier run
        for old in [*out.glob("*_vs_lr*.png"), *out.glob("*weight_distance*.png")]:
            old.unlink(missing_ok=True)
    return harm_vs_lr(records, out) + weight_distance_plots(results_dir, out)
