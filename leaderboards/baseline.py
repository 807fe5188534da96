"""A nightly baseline: the metrics of a suite run kept on purpose (``results/baselines/<suite>.json``).

``Baseline`` reads and writes that file (the format is unchanged since the first release: ``schema``
1, then provenance, ``cells`` and ``metrics``; a file that is not such a baseline is a one-line
``ConfigError`` naming it). A baseline that cannot be compared with a run of a suite is an error, never
a pass: ``Baseline.check(suite)`` refuses one of another suite, one without metrics, one whose cells
or metrics name no cell of the suite; ``MetricStats`` refuses a mean, std or value that is not a
finite number (NaN, inf, a string), a negative std and ``n`` < 1. ``MetricStats`` is one metric of one cell over seeds, ``CellMetrics`` all
metrics of one cell, as a run measures them and as a baseline holds them.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, model_validator

from harness.api.errors import ConfigError
from leaderboards.suite import Suite

BASELINE_SCHEMA = 1


class MetricStats(BaseModel):
    """One metric of one cell over seeds (a baseline's ``metrics`` entry)."""

    model_config = ConfigDict(extra="forbid")

    mean: FiniteFloat
    std: FiniteFloat = Field(0.0, ge=0.0)
    n: int = Field(1, ge=1)
    values: list[FiniteFloat] = Field(default_factory=list)
    hint: Optional[str] = None
    """Direction hint from the record (lm-eval's ``higher_is_better: false`` -> ``higher_is_worse``)."""

    @model_validator(mode="after")
    def _consistent(self) -> "MetricStats":
        if self.values and len(self.values) != self.n:
            raise ValueError(f"n = {self.n} but {len(self.values)} value(s) are listed")
        return self

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(exclude={"hint"} if self.hint is None else set())


def summarize(values: Sequence[float]) -> MetricStats:
    return MetricStats(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                       n=len(values), values=[round(v, 10) for v in values])


@dataclass
class CellMetrics:
    """What one suite cell measured: metric -> stats over seeds, direction hints, the trials."""

    defence: str
    attack: str = "?"
    metrics: dict[str, MetricStats] = field(default_factory=dict)
    hints: dict[str, str] = field(default_factory=dict)
    trial_ids: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)


class BaselineCell(BaseModel):
    """A cell of the suite as the baseline run had it."""

    model_config = ConfigDict(extra="forbid")

    defence: str
    attack: str = "?"
    trial_ids: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=list)


class Baseline(BaseModel):
    """``results/baselines/<suite>.json``: the metrics of a suite run kept on purpose, with where they came from."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_version: int = Field(BASELINE_SCHEMA, alias="schema")
    suite: Optional[str] = None
    suite_sha: Optional[str] = None
    created_at: Optional[str] = None
    harness: Optional[str] = None
    git: Optional[dict[str, Any]] = None
    device: Optional[str] = None
    model: Optional[str] = None
    overrides: list[str] = Field(default_factory=list)
    cells: dict[str, BaselineCell] = Field(default_factory=dict)
    metrics: dict[str, MetricStats] = Field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, where: str = "baseline") -> "Baseline":
        """Validate a parsed baseline; ``ConfigError`` of one line naming ``where`` otherwise."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a baseline must be a JSON object, got {type(data).__name__}")
        version = data.get("schema", BASELINE_SCHEMA)
        if version != BASELINE_SCHEMA:
            raise ConfigError(f"{where}: baseline schema {version!r} is not the one this harness reads "
                              f"({BASELINE_SCHEMA}); remake it with --update-baseline")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ())) or "(root)"
            raise ConfigError(f"{where}: field '{loc}': {first.get('msg')} ({exc.error_count()} problem(s) in all)") \
                from None

    @classmethod
    def read(cls, path: str | Path) -> "Baseline":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"baseline {path} is not valid JSON: {exc}") from None
        except ValueError as exc:  # NaN / Infinity literals
            raise ConfigError(f"baseline {path}: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"baseline {path} cannot be read: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        return cls.from_json(data, where=f"baseline {path}")

    def check(self, suite: Suite, where: str = "baseline") -> "Baseline":
        """Raise ``ConfigError`` (one line naming ``where``) unless this baseline can be compared with
        a run of ``suite``: made for that suite, with metrics, every metric in a cell of the suite."""
        if self.suite is not None and self.suite != suite.name:
            raise ConfigError(f"{where}: made for suite {self.suite!r}, not {suite.name!r}; use that suite's "
                              f"baseline or remake it with --update-baseline")
        if not self.metrics:
            raise ConfigError(f"{where}: holds no metrics: nothing to compare with (remake it with --update-baseline)")
        names = {t.name for t in suite.trials}
        foreign = sorted(set(self.cells) - names)
        if foreign:
            raise ConfigError(f"{where}: cell(s) {', '.join(foreign)} are not in suite {suite.name!r} (cells: "
                              f"{', '.join(sorted(names))}); the baseline is of another version of the suite: "
                              "remake it with --update-baseline")
        known = set(self.cells) | names
        stray = sorted(k for k in self.metrics if cell_of(k, known) not in names or "/" not in k)
        if stray:
            raise ConfigError(f"{where}: metric(s) {', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''} "
                              f"name no cell of suite {suite.name!r}; remake it with --update-baseline")
        return self

    def to_json(self) -> dict[str, Any]:
        out = self.model_dump(by_alias=True, exclude={"metrics"})
        out["metrics"] = {k: v.to_json() for k, v in self.metrics.items()}
        return out

    @classmethod
    def of_run(cls, suite: Suite, cells: dict[str, CellMetrics], env: dict[str, Any], extra_sets: Sequence[str],
               model: str, created_at: str) -> "Baseline":
        """The baseline a run makes (``--update-baseline``)."""
        metrics = {}
        for cell, info in sorted(cells.items()):
            for m, stats in info.metrics.items():
                hint = info.hints.get(m)
                metrics[f"{cell}/{m}"] = stats.model_copy(update={"hint": hint}) if hint else stats
        return cls(suite=suite.name, suite_sha=suite.sha, created_at=created_at, harness=env.get("harness"),
                   git=env.get("git"), device=env.get("device"), model=model, overrides=list(extra_sets),
                   cells={c: BaselineCell(defence=i.defence, attack=i.attack, trial_ids=i.trial_ids, seeds=i.seeds)
                          for c, i in sorted(cells.items())},
                   metrics=metrics)

    def cell_metrics(self) -> dict[str, CellMetrics]:
        """The baseline's metrics by cell, in the shape of a run (to compare a baseline with another)."""
        out = {c: CellMetrics(i.defence, i.attack, trial_ids=list(i.trial_ids), seeds=list(i.seeds))
               for c, i in self.cells.items()}
        for key, stats in self.metrics.items():
            cell = cell_of(key, out)
            info = out.setdefault(cell, CellMetrics("*"))
            metric = key[len(cell) + 1:]
            info.metrics[metric] = stats
            if stats.hint:
                info.hints[metric] = stats.hint
        return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"holds {name}, not a number: a baseline that cannot be compared (remake it with --update-baseline)")


def cell_of(key: str, cells: Any) -> str:
    """The cell a ``CELL/METRIC`` key belongs to (the longest known cell name that prefixes it)."""
    return next((c for c in sorted(cells, key=len, reverse=True) if key.startswith(c + "/")), key.split("/")[0])
