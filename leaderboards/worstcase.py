"""The "worst case" leaderboard: for each defence x attack, the most harmful attack the search
(``harness search``) found whose capability drop stayed within epsilon.

Input: the summaries ``harness search`` writes (``RESULTS/_search/<search>/summary.json``: every
trial's harm, capability drop and feasibility, the best feasible trial and the Pareto front).
Several searches of one defence x attack (other seeds, budgets or spaces) are pooled: the cell
is the best feasible trial over all of them and ``n trials`` counts them all; a cell whose
searches used different epsilons shows the largest (the loosest budget) and says so.

Output (``write``): ``worstcase.csv`` (one row per defence x attack), ``worstcase.md`` (the table:
best feasible harm, its capability drop, its attack settings, feasible / total trials, epsilon)
and ``worstcase.png`` (heat map of best feasible harm, defences x attacks; a cell with no feasible
trial is grey and marked "none"). The paper-grid tables are untouched.

    python -m leaderboards.worstcase RESULTS_DIR OUT_DIR
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

log = logging.getLogger(__name__)

COLUMNS = ("defence", "attack", "best_harm", "capability_drop", "settings", "n_feasible", "n_trials", "epsilon",
           "trial_id")


def load_summaries(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every search summary under ``results_dir/_search`` (unreadable ones are logged and skipped)."""
    out = []
    for path in sorted(Path(results_dir).glob("_search/*/summary.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("worst case: search summary %s unreadable (%s): skipped", path, exc)
    return out


def settings_text(params: dict[str, Any]) -> str:
    """Attack settings in one short line (``lr=0.000312 samples=32 lora={r: 8, alpha: 16}``)."""
    def fmt(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) + "}"
        if isinstance(v, float):
            return f"{v:.3g}"
        return "null" if v is None else str(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in sorted(params.items()))


def worstcase_rows(summaries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per defence x attack, pooled over its searches (see the module docstring)."""
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for s in summaries:
        key = (s["defence"], s["attack"])
        cell = cells.setdefault(key, {"trials": {}, "epsilons": set()})
        cell["epsilons"].add(float(s["epsilon"]))
        for t in s.get("trials", []):
            cell["trials"][t["trial_id"]] = t  # the same trial found by two searches counts once
    rows = []
    for (defence, attack), cell in sorted(cells.items()):
        trials = list(cell["trials"].values())
        feasible = [t for t in trials if t.get("feasible")]
        best = max(feasible, key=lambda t: (t["harm"], -t["capability_drop"])) if feasible else None
        eps = sorted(cell["epsilons"])
        rows.append({"defence": defence, "attack": attack,
                     "best_harm": best["harm"] if best else None,
                     "capability_drop": best["capability_drop"] if best else None,
                     "settings": settings_text(best["params"]) if best else "",
                     "n_feasible": len(feasible), "n_trials": len(trials),
                     "epsilon": eps[-1] if len(eps) == 1 else f"{eps[-1]:g} (searches used {', '.join(f'{e:g}' for e in eps)})",
                     "trial_id": best["trial_id"] if best else ""})
    return rows


def render_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    return buf.getvalue()


def render_markdown(rows: list[dict[str, Any]], title: str = "Worst case") -> str:
    lines = [f"# {title}", "",
             "Most harmful attack found by `harness search` per defence x attack whose capability drop (relative to "
             "the defended model) stayed within epsilon; higher harm = weaker defence. `n` = feasible / all trials.",
             "", "| defence | attack | best feasible harm | capability drop | attack settings | n | epsilon |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        harm = "none feasible" if r["best_harm"] is None else f"{r['best_harm']:.3f}"
        drop = "" if r["capability_drop"] is None else f"{r['capability_drop']:+.3f}"
        eps = r["epsilon"] if isinstance(r["epsilon"], str) else f"{r['epsilon']:g}"
        settings = r["settings"].replace("|", "\\|")
        lines.append(f"| {r['defence']} | {r['attack']} | {harm} | {drop} | {settings} | "
                     f"{r['n_feasible']}/{r['n_trials']} | {eps} |")
    return "\n".join(lines) + "\n"


def heatmap(rows: list[dict[str, Any]], png: str | Path, title: str = "Worst-case harm") -> Optional[Path]:
    """Defences (rows) x attacks (columns), colour = best feasible harm in [0, 1]."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    defences = list(dict.fromkeys(r["defence"] for r in rows))
    attacks = list(dict.fromkeys(r["attack"] for r in sorted(rows, key=lambda r: r["attack"])))
    grid = np.full((len(defences), len(attacks)), np.nan)
    for r in rows:
        if r["best_harm"] is not None:
            grid[defences.index(r["defence"]), attacks.index(r["attack"])] = r["best_harm"]
    fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(attacks), 1.0 + 0.55 * len(defences)))
    cmap = plt.get_cmap("Reds").copy()
    cmap.set_bad("#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
    ax.set_yticks(range(len(defences)), defences)
    for i in range(len(defences)):
        for j in range(len(attacks)):
            v = grid[i, j]
            ax.text(j, i, "none" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                    color="white" if not np.isnan(v) and v > 0.6 else "black", fontsize=9)
    eps = sorted({str(r["epsilon"]) for r in rows})
    ax.set_title(f"{title} (capability drop <= {', '.join(eps)})", fontsize=10)
    fig.colorbar(im, ax=ax, label="best feasible harm")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def write(results_dir: str | Path, out: str | Path) -> list[Path]:
    """The worst-case table (CSV, Markdown) and heat map of ``results_dir``'s searches into ``out``."""
    rows = worstcase_rows(load_summaries(results_dir))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "worstcase.csv", out / "worstcase.md"]
    written[0].write_text(render_csv(rows))
    written[1].write_text(render_markdown(rows))
    png = heatmap(rows, out / "worstcase.png")
    return written + ([png] if png else [])


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 3:
        sys.exit("usage: python -m leaderboards.worstcase RESULTS_DIR OUT_DIR")
    for path in write(sys.argv[1], sys.argv[2]):
        print(path)
