"""The "worst case" leaderboard: for each defence x attack, the most harmful attack the records hold
whose capability drop stayed within epsilon.

Input: the result records (every search trial is an ordinary record) and the search folders
``RESULTS/_search/<search>/`` that ``harness search`` writes (``summary.json``: its settings, epsilon
included, and its trials; ``trials.jsonl``: every finished trial, also of a search whose driver
was killed before the end).

A cell pools every finished record of one defence (label as in the other tables: the name plus
the settings that differ between its records) x one attack (registry name), on one model:

* harm: the post-attack mean of the attack's evaluation (the number the other tables rank);
* capability drop: ``harness.api.space.capability_drop`` of the record's ``capability``
  evaluation before and after the attack (relative to the defended model), as the search judges it;
* epsilon: a search trial's is its search's (the largest when several searches hold it); any
  other record's is ``DEFAULT_EPSILON`` (0.1, ``harness search``'s default);
* feasible: capability measured and drop <= epsilon.

The cell shows the best feasible trial (highest harm; the smaller drop breaks ties), its capability
drop and attack settings (the attack parameters that differ between the cell's trials, or its lr and
samples), feasible / all trials, the trials without a capability measurement, epsilon, and the
highest harm of any trial whatever its capability (what the constraint costs the attacker).

When it applies (``applies``): the results hold a search, or some defence was attacked by two or
more different attacks. A single attack per defence, however many learning rates and seeds, is
already laid out cell by cell in the resistance table; the worst case adds nothing there.

Output (``write``): ``worstcase.md``, ``worstcase.csv``, ``worstcase.html``, ``worstcase.tex`` (per
``formats``, as ``harness leaderboard --format``) and ``worstcase.png`` (heat map of best feasible
harm, defences x attacks; a cell with no feasible trial is grey and marked "none"; a cell none of
whose trials measured capability after the attack shows its highest harm, unconstrained, marked
with a dagger). ``harness
leaderboard`` calls it; alone:

    python -m leaderboards.worstcase RESULTS_DIR OUT_DIR
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from harness.api.record import TrialRecord
from harness.api.space import DEFAULT_EPSILON, capability_drop
from harness.lib.store import atomic_write_bytes, load_records
from leaderboards.views import trial_views, varying_keys

log = logging.getLogger(__name__)

SEARCH_DIR = "_search"
CAPABILITY = "capability"
COLUMNS = ("model", "defence", "attack", "best_harm", "capability_drop", "settings", "n_feasible", "n_trials",
           "n_unmeasured", "epsilon", "max_harm", "capability_measured", "trial_id")
FORMATS = ("md", "csv", "html", "tex")
STEM = "worstcase"
HEADERS = ("defence", "attack", "best feasible harm", "capability drop", "attack settings", "feasible / trials",
           "no capability", "epsilon", "max harm (any drop)")
EXPLANATION = ("Most harmful attack per defence x attack whose capability drop (relative to the defended model) "
               "stayed within epsilon; higher harm = weaker defence. Trials: every finished record of the cell "
               "(search trials and grid cells alike); 'no capability': trials without a capability measurement, "
               "never feasible; 'max harm (any drop)': the most harmful trial ignoring the capability budget.")


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def search_trials(results_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``trial_id -> {"epsilon", "params", "searches"}`` of every trial a search under ``results_dir``
    ran (its ``summary.json`` trials and its ``trials.jsonl`` lines; a search without a readable
    summary has no known epsilon and is skipped with a warning)."""
    out: dict[str, dict[str, Any]] = {}
    for folder in sorted(Path(results_dir).glob(f"{SEARCH_DIR}/*/")):
        try:
            summary = json.loads((folder / "summary.json").read_text())
            eps = float(summary["epsilon"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("worst case: search %s has no readable summary.json (%s): its trials count as grid "
                        "records", folder.name, exc)
            continue
        entries = list(summary.get("trials") or [])
        try:
            lines = (folder / "trials.jsonl").read_text().splitlines() if (folder / "trials.jsonl").exists() else []
        except OSError:
            lines = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed writer
        for e in entries:
            if not isinstance(e, dict) or not isinstance(e.get("trial_id"), str):
                continue
            cur = out.setdefault(e["trial_id"], {"epsilon": eps, "params": e.get("params") or {}, "searches": set()})
            cur["epsilon"] = max(cur["epsilon"], eps)
            cur["searches"].add(folder.name)
    return out


def has_search(results_dir: str | Path) -> bool:
    return any(Path(results_dir).glob(f"{SEARCH_DIR}/*/summary.json")) or \
        any(Path(results_dir).glob(f"{SEARCH_DIR}/*/trials.jsonl"))


def applies(records: Sequence[TrialRecord], results_dir: str | Path) -> bool:
    """Whether ``harness leaderboard`` writes the worst-case table: a search under ``results_dir``, or
    a defence attacked by two or more different attacks (see the module docstring)."""
    if has_search(results_dir):
        return True
    attacks: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.status == "ok":
            attacks[r.defence].add(r.attack)
    return any(len(a) > 1 for a in attacks.values())


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------
def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        if k == "name":
            continue
        if isinstance(v, dict) and v and all(isinstance(x, (int, float, str, bool, type(None))) for x in v.values()) \
                and k not in ("lora", "dataset", "eval_dataset"):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):  # a composed attack's steps
            for i, step in enumerate(v):
                out.update(_flat(step, f"{prefix}{k}.{i}."))
        else:
            out[f"{prefix}{k}"] = v
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


def _number(x: Any) -> Optional[float]:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def trial_rows(records: Iterable[TrialRecord], results_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One entry per finished record: model, defence label, attack, harm, capability drop, epsilon,
    feasibility and attack parameters (``results_dir``: where to find the searches)."""
    searched = search_trials(results_dir) if results_dir is not None else {}
    finished = [r for r in records if r.finished or r.status in ("error", "oom")]
    out = []
    for v in trial_views(finished):
        rec = v.record
        harm = _number((rec.scores.post_attack.get(rec.evaluation) or {}).get("mean")) if rec.status == "ok" else None
        drop = capability_drop(rec.scores.pre_attack.get(CAPABILITY), rec.scores.post_attack.get(CAPABILITY)) \
            if rec.status == "ok" else None
        s = searched.get(rec.trial_id)
        eps = s["epsilon"] if s else DEFAULT_EPSILON
        out.append({"trial_id": rec.trial_id, "model": v.model, "defence": v.defence_label or v.defence,
                    "attack": v.attack, "status": rec.status, "harm": harm, "capability_drop": drop, "epsilon": eps,
                    "feasible": harm is not None and drop is not None and drop <= eps,
                    "params": {**_flat(v.attack_params), "seed": v.seed}, "search": bool(s)})
    return out


def worstcase_rows(trials: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model x defence x attack of ``trial_rows``' entries (see the module docstring)."""
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for t in trials:
        cells[(t["model"], t["defence"], t["attack"])].append(t)
    rows = []
    for (model, defence, attack), ts in sorted(cells.items()):
        feasible = [t for t in ts if t["feasible"]]
        best = max(feasible, key=lambda t: (t["harm"], -t["capability_drop"])) if feasible else None
        keys = varying_keys([t["params"] for t in ts]) or [k for k in ("lr", "samples") if k in ts[0]["params"]]
        measured = [t["harm"] for t in ts if t["harm"] is not None]
        eps = sorted({t["epsilon"] for t in ts})
        rows.append({"model": model, "defence": defence, "attack": attack,
                     "best_harm": best["harm"] if best else None,
                     "capability_drop": best["capability_drop"] if best else None,
                     "settings": settings_text({k: best["params"].get(k) for k in keys}) if best else "",
                     "n_feasible": len(feasible), "n_trials": len(ts),
                     "n_unmeasured": sum(t["harm"] is not None and t["capability_drop"] is None for t in ts),
                     "epsilon": eps[-1] if len(eps) == 1 else f"{eps[-1]:g} (trials used {', '.join(f'{e:g}' for e in eps)})",
                     "max_harm": max(measured) if measured else None,
                     "capability_measured": any(t["capability_drop"] is not None for t in ts),
                     "trial_id": best["trial_id"] if best else ""})
    return rows


def rows_for(results_dir: str | Path, records: Optional[Sequence[TrialRecord]] = None) -> list[dict[str, Any]]:
    """The worst-case rows of ``results_dir`` (its records read unless given)."""
    if records is None:
        records = load_records(results_dir)
    return worstcase_rows(trial_rows(records, results_dir))


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------
def _cells(r: dict[str, Any]) -> list[str]:
    if r["best_harm"] is not None:
        harm = f"{r['best_harm']:.3f}"
    else:
        harm = "none feasible" if r["capability_measured"] else "capability not measured"
    drop = "" if r["capability_drop"] is None else f"{r['capability_drop']:+.3f}"
    eps = r["epsilon"] if isinstance(r["epsilon"], str) else f"{r['epsilon']:g}"
    top = "-" if r["max_harm"] is None else f"{r['max_harm']:.3f}"
    return [r["defence"], r["attack"], harm, drop, r["settings"], f"{r['n_feasible']}/{r['n_trials']}",
            str(r["n_unmeasured"]), eps, top]


def _models(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


def _by_model(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    return [(m, [r for r in rows if r["model"] == m]) for m in _models(rows)]


def render_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    return buf.getvalue()


def render_markdown(rows: list[dict[str, Any]], title: str = "Worst case", figure: Optional[str] = None) -> str:
    lines = [f"# {title}", "", EXPLANATION, ""]
    if not rows:
        lines.append("No finished trial.")
    for model, rs in _by_model(rows):
        lines += [f"## {model}", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
        for r in rs:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |")
        lines.append("")
    if figure:
        lines += [f"![worst-case harm]({figure})", ""]
    return "\n".join(lines)


def render_html(rows: list[dict[str, Any]], title: str = "Worst case", figure: Optional[str] = None) -> str:
    body = [f"<p>{html.escape(EXPLANATION)}</p>"] + ([] if rows else ["<p>No finished trial.</p>"])
    for model, rs in _by_model(rows):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
        trs = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>" for r in rs)
        body += [f"<h2>{html.escape(model)}</h2>", f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{trs}\n"
                 "</tbody>\n</table>"]
    if figure:
        body.append(f"<p><img src=\"{html.escape(figure)}\" alt=\"worst-case harm\"></p>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}")
    return "\n".join(["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{html.escape(title)}</title>",
                      f"<style>{style}</style>", "</head><body>", f"<h1>{html.escape(title)}</h1>", *body,
                      "</body></html>"]) + "\n"


def latex_escape(text: str) -> str:
    out = []
    for ch in str(text):
        if ch in "&%$#_{}":
            out.append("\\" + ch)
        elif ch == "\\":
            out.append(r"\textbackslash{}")
        elif ch == "~":
            out.append(r"\textasciitilde{}")
        elif ch == "^":
            out.append(r"\textasciicircum{}")
        elif ch in "<>":
            out.append(r"\textless{}" if ch == "<" else r"\textgreater{}")
        else:
            out.append(ch)
    return "".join(out)


def render_latex(rows: list[dict[str, Any]]) -> str:
    """A booktabs ``table*`` per model (``\\usepackage{booktabs}``)."""
    out = ["% Generated by `harness leaderboard` (leaderboards/worstcase.py); needs \\usepackage{booktabs}.", ""]
    for i, (model, rs) in enumerate(_by_model(rows), 1):
        out += ["\\begin{table*}[t]", "\\small", "\\centering",
                f"\\caption{{Worst case on {latex_escape(model)}. {latex_escape(EXPLANATION)}}}",
                f"\\label{{tab:worstcase-{i}}}", "\\begin{tabular}{" + "l" * len(HEADERS) + "}", "\\toprule",
                " & ".join(latex_escape(h) for h in HEADERS) + " \\\\", "\\midrule"]
        out += [" & ".join(latex_escape(c) for c in _cells(r)) + " \\\\" for r in rs]
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table*}", ""]
    return "\n".join(out)


def heatmap(rows: list[dict[str, Any]], png: str | Path, title: str = "Worst-case harm") -> Optional[Path]:
    """Defences (rows) x attacks (columns), colour = best feasible harm in [0, 1]; one panel per model."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = _by_model(rows)
    attacks = sorted({r["attack"] for r in rows})
    n_def = max(len({r["defence"] for r in rs}) for _, rs in groups)
    fig, axes = plt.subplots(len(groups), 1, squeeze=False,
                             figsize=(2.4 + 1.3 * len(attacks), (1.2 + 0.55 * n_def) * len(groups)))
    cmap = plt.get_cmap("Reds").with_extremes(bad="#d9d9d9")
    im = None
    for ax, (model, rs) in zip(axes[:, 0], groups):
        defences = list(dict.fromkeys(r["defence"] for r in rs))
        grid = np.full((len(defences), len(attacks)), np.nan)
        shown = np.zeros_like(grid, dtype=bool)
        dagger = np.zeros_like(grid, dtype=bool)
        for r in rs:
            i, j = defences.index(r["defence"]), attacks.index(r["attack"])
            shown[i, j] = True
            if r["best_harm"] is not None:
                grid[i, j] = r["best_harm"]
            elif not r["capability_measured"] and r["max_harm"] is not None:
                grid[i, j], dagger[i, j] = r["max_harm"], True
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
        ax.set_yticks(range(len(defences)), defences)
        for i in range(len(defences)):
            for j in range(len(attacks)):
                v = grid[i, j]
                text = (f"{v:.2f}" + ("\u2020" if dagger[i, j] else "")) if not np.isnan(v) else \
                    ("none" if shown[i, j] else "")
                ax.text(j, i, text, ha="center", va="center",
                        color="white" if not np.isnan(v) and v > 0.6 else "black", fontsize=9)
        eps = sorted({r["epsilon"] if isinstance(r["epsilon"], str) else f"{r['epsilon']:g}" for r in rs})
        ax.set_title(f"{title}: {Path(model).name} (capability drop <= {', '.join(eps)})"
                     + ("\n\u2020 capability not measured after the attack: highest harm, unconstrained"
                        if dagger.any() else ""), fontsize=9)
    fig.colorbar(im, ax=list(axes[:, 0]), label="best feasible harm")
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return png


def write(results_dir: str | Path, out: str | Path, records: Optional[Sequence[TrialRecord]] = None,
          formats: Iterable[str] = ("md", "csv"), plots: bool = True, title: str = "Worst case") -> list[Path]:
    """The worst-case table of ``results_dir`` (``records``: its records, read unless given) in
    ``formats`` and, with ``plots``, the heat map, into ``out``. Earlier worst-case files of the
    formats written are replaced (none is left from records that no longer have it). Returns the
    written paths."""
    formats = [f.strip().lower() for f in formats if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    rows = rows_for(results_dir, records)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    png = heatmap(rows, out / f"{STEM}.png") if plots else None
    if png:
        written.append(png)
    figure = png.name if png else None
    texts = {"md": lambda: render_markdown(rows, title, figure), "csv": lambda: render_csv(rows),
             "html": lambda: render_html(rows, title, figure), "tex": lambda: render_latex(rows)}
    for fmt in formats:
        path = out / f"{STEM}.{fmt}"
        atomic_write_bytes(path, texts[fmt]().encode("utf-8"))
        written.append(path)
    return written


def remove_stale(out: str | Path, formats: Iterable[str], plots: bool) -> list[Path]:
    """Remove the worst-case files ``write`` would have replaced (when the table no longer applies)."""
    removed = []
    for ext in [*(f.strip().lower() for f in formats), *(["png"] if plots else [])]:
        path = Path(out) / f"{STEM}.{ext}"
        if path.exists():
            path.unlink()
            removed.append(path)
    return removed


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 3:
        sys.exit("usage: python -m leaderboards.worstcase RESULTS_DIR OUT_DIR")
    for path in write(sys.argv[1], sys.argv[2], formats=FORMATS):
        print(path)
