"""Table cells and tables: the numbers behind one cell, its text, and a table of cells.

A ``Cell`` collects one value per seed (records of the same seed are averaged first) and the
failures of seeds that have no value; its text is ``mean ± sample std (n=seeds)``, or says why
there is no number: ``not run`` (no record), ``failed (1 diverged, 1 oom)`` (every seed failed),
``0.412 ± 0.031 (n=2; failed: 1 error)`` (some seeds failed), ``no result (1 running)``, ``not
measured`` (the trial finished without that metric), or a fixed text such as ``base``.

``build_table`` turns ``{(row, column): Cell}`` into a ``Table``: the formatted frame, a long frame
of the numbers behind every cell (``cells.csv``), the caption and its context. A statistic added
later (a confidence interval, a paired test against the base row) is a property of ``Cell`` plus a
column of the long frame.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import pandas as pd

from leaderboards.views import BASE, FAILED_STATUSES, TrialView

MARK_LOWER = "↓"
DIGITS = 3
LONG_COLUMNS = ["defence", "column", "mean", "std", "n", "failed", "below_base", "text"]


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

    @property
    def failure_text(self) -> str:
        fails = self.failure_counts
        return ", ".join(f"{fails[s]} {s}" for s in sorted(fails))

    def text(self, mark: str = "") -> str:
        if self.text_override is not None:
            return self.text_override
        fails = self.failure_counts
        fail_text = self.failure_text
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
    cells: pd.DataFrame  # long: LONG_COLUMNS
    context: dict[str, str]


def context(views: Sequence[TrialView], scorer: str) -> dict[str, str]:
    """What a caption names: model(s), scorer, attack loss mode(s), harness version(s)."""
    def join(values):
        vals = sorted({str(v) for v in values})
        return ", ".join(vals) if vals else "unknown"

    return {"model": join(v.model for v in views), "scorer": scorer,
            "loss_on": join(v.loss_on for v in views), "harness": join(v.harness for v in views)}


def caption_tail(ctx: dict[str, str], seeds: int, pre_attack_only: bool = False) -> str:
    loss = ctx["loss_on"]
    if pre_attack_only:
        loss_text = "of the attacked runs; this table is measured before the attack"
    else:
        loss_text = {"response": "response tokens only", "all": "all tokens, prompt and padding included, as the "
                     "original code"}.get(loss, "several modes")
    return (f"Model: {ctx['model']}. Scorer: {ctx['scorer']}. Attack loss mode (attack.loss_on): {loss} "
            f"({loss_text}). Harness version: {ctx['harness']}. Seeds: {seeds}.")


def build_table(kind: str, title: str, caption: str, ctx: dict[str, str], rows: list[str], columns: list[str],
                cells: dict[tuple[str, str], Cell], mark_columns: Iterable[str] = ()) -> Table:
    """The ``Table`` of ``cells``; in ``mark_columns`` a row whose mean is below the base row's gets ``↓``."""
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
            long_rows.append({"defence": row, "column": col, "mean": cell.mean, "std": cell.std, "n": cell.n,
                              "failed": cell.failure_text, "below_base": bool(mark), "text": text})
    long = pd.DataFrame(long_rows, columns=LONG_COLUMNS)
    long["mean"] = pd.to_numeric(long["mean"], errors="coerce").astype(float)
    long["std"] = pd.to_numeric(long["std"], errors="coerce").astype(float)
    return Table(kind, title, caption, frame, long, ctx)


def n_seeds(views: Sequence[TrialView]) -> int:
    return len({str(v.seed) for v in views})


def groups(views: Sequence[TrialView], key: Callable[[TrialView], tuple]) -> list[list[TrialView]]:
    """Views grouped by ``key``: the group with most records first (the main table), then a fixed order."""
    out: dict[tuple, list[TrialView]] = defaultdict(list)
    for v in views:
        out[key(v)].append(v)
    return [out[k] for k in sorted(out, key=lambda k: (-len(out[k]), tuple(str(x) for x in k)))]
