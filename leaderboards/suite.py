"""A nightly regression suite: what a ``leaderboards/suites/<name>.yaml`` file says, validated.

A suite is a YAML file in ``leaderboards/suites/`` (or any path)::

    description: what it checks
    preset: smoke                    # harness preset every trial starts from
    model: smollm2-135m-instruct     # or {tiny: {...}}: a tiny model built locally by the runner
    seeds: [0]                       # every trial runs once per seed
    sets: [eval.samples=16]          # --set overrides for every trial
    data:                            # optional inline datasets, written to a fixed temp folder;
      qa: {prompts: [...], response: "...", refusal: "..."}   # "{data:qa}" in a set names the file
    trials:
      - name: none                   # the cell's name in the baseline and report (default DEFENCE/ATTACK)
        defence: none
        attack: harmfulqa
        sets: [attack.lr=8e-5]       # overrides for this trial only
    tolerances:                      # rules tried before the defaults (leaderboards/nightly.py); first match wins
      - {match: "post_attack/harmfulness/*", defence: "*", abs: 0.1, k_std: 2, direction: higher_is_worse}

Every mistake is a ``ConfigError`` of one line naming the suite, the key and what is allowed. The
file is read with the checked reader (``harness.api.safeio.load_yaml``): a folder, FIFO, binary or
non-UTF-8 file, a file over ``HARNESS_MAX_CONFIG_MB``, YAML whose aliases expand past
``MAX_YAML_NODES`` values (a "billion laughs") or nesting past ``MAX_DEPTH`` is refused in one line
before anything is built.
Running a suite (building its models, running its trials) is ``harness.sweep.nightly``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.api.errors import ConfigError
from harness.api.safeio import check_path, parse_yaml, read_text

SUITE_DIR = Path(__file__).resolve().parent / "suites"
DIRECTIONS = ("higher_is_worse", "lower_is_worse", "both", "info")
SUITE_KEYS = {"description", "preset", "model", "seeds", "sets", "data", "trials", "tolerances"}
TRIAL_KEYS = {"name", "defence", "attack", "model", "sets", "seeds", "preset"}
RULE_KEYS = {"match", "defence", "cell", "abs", "k_std", "direction"}


@dataclass
class SuiteTrial:
    """One trial of a suite (run once per seed)."""

    name: str
    defence: str
    attack: str
    sets: list[str]
    seeds: list[int]
    preset: str
    model: Any


@dataclass
class Suite:
    """A parsed suite file; ``sha``: the first 12 hex digits of the file's SHA-256 (named in reports)."""

    name: str
    path: Path
    description: str
    preset: str
    model: Any
    seeds: list[int]
    sets: list[str]
    data: dict[str, Any]
    trials: list[SuiteTrial]
    rules: list[dict[str, Any]]
    sha: str


def suite_names() -> list[str]:
    return sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise ConfigError(f"suite: {where} must be a list of strings, not {value!r}")
    return [str(v) for v in value]


def _seeds(value: Any, where: str) -> list[int]:
    if isinstance(value, int):
        return [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, int) for v in value):
        raise ConfigError(f"suite: {where} must be a non-empty list of integers, not {value!r}")
    return list(value)


def check_rule(rule: Any, where: str) -> dict[str, Any]:
    """A tolerance rule, checked: ``match`` (a metric glob), optional ``defence``/``cell`` globs,
    ``abs``/``k_std`` >= 0, ``direction`` in ``DIRECTIONS``."""
    if not isinstance(rule, dict) or "match" not in rule:
        raise ConfigError(f"suite: {where} must be a mapping with at least 'match' (a metric glob)")
    unknown = sorted(set(rule) - RULE_KEYS)
    if unknown:
        raise ConfigError(f"suite: {where}: unknown key(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(RULE_KEYS))}")
    if "direction" in rule and rule["direction"] not in DIRECTIONS:
        raise ConfigError(f"suite: {where}.direction = {rule['direction']!r}; allowed: {', '.join(DIRECTIONS)}")
    for key in ("abs", "k_std"):
        if key in rule and (not isinstance(rule[key], (int, float)) or rule[key] < 0):
            raise ConfigError(f"suite: {where}.{key} = {rule[key]!r}: must be a number >= 0")
    return dict(rule)


def load_suite(name_or_path: str) -> Suite:
    """A suite by name (``leaderboards/suites/<name>.yaml``) or by the path of a YAML file."""
    path = check_path(name_or_path, "suite")
    if path.suffix not in (".yaml", ".yml"):
        path = SUITE_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown suite {name_or_path!r}; known suites: {', '.join(suite_names()) or '(none)'} "
                              f"(or give a path to a YAML file)")
    text = read_text(path, "suite file")
    raw = parse_yaml(text, f"suite file {str(path)!r}")
    if not isinstance(raw, dict):
        raise ConfigError(f"suite file {str(path)!r} must hold a mapping")
    unknown = sorted(set(raw) - SUITE_KEYS)
    if unknown:
        raise ConfigError(f"suite {path.stem!r}: unknown key(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(SUITE_KEYS))}")
    preset = str(raw.get("preset", "smoke"))
    seeds = _seeds(raw.get("seeds", [0]), "seeds")
    sets = _str_list(raw.get("sets"), "sets")
    trials_raw = raw.get("trials")
    if not isinstance(trials_raw, list) or not trials_raw:
        raise ConfigError(f"suite {path.stem!r}: 'trials' must be a non-empty list")
    trials, names = [], set()
    for i, t in enumerate(trials_raw):
        if not isinstance(t, dict) or "defence" not in t or "attack" not in t:
            raise ConfigError(f"suite {path.stem!r}: trials[{i}] must be a mapping with 'defence' and 'attack'")
        bad = sorted(set(t) - TRIAL_KEYS)
        if bad:
            raise ConfigError(f"suite {path.stem!r}: trials[{i}]: unknown key(s) {', '.join(bad)}; "
                              f"allowed: {', '.join(sorted(TRIAL_KEYS))}")
        name = str(t.get("name") or f"{t['defence']}/{t['attack']}")
        if name in names:
            raise ConfigError(f"suite {path.stem!r}: two trials are named {name!r}; give them distinct 'name's")
        names.add(name)
        trials.append(SuiteTrial(name=name, defence=str(t["defence"]), attack=str(t["attack"]),
                                 sets=_str_list(t.get("sets"), f"trials[{i}].sets"),
                                 seeds=_seeds(t["seeds"], f"trials[{i}].seeds") if "seeds" in t else seeds,
                                 preset=str(t.get("preset", preset)), model=t.get("model")))
    rules = [check_rule(r, f"tolerances[{i}]") for i, r in enumerate(raw.get("tolerances") or [])]
    data = raw.get("data") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"suite {path.stem!r}: 'data' must map names to datasets")
    return Suite(name=path.stem, path=path, description=str(raw.get("description", "")), preset=preset,
                 model=raw.get("model"), seeds=seeds, sets=sets, data=data, trials=trials, rules=rules,
                 sha=hashlib.sha256(text.encode()).hexdigest()[:12])


def data_rows(name: str, spec: Any) -> list[dict[str, str]]:
    """The rows of an inline dataset: ``[{prompt, response, refusal}, ...]`` or
    ``{prompts: [...], response: str, refusal: str}``."""
    if isinstance(spec, list):
        rows = spec
    elif isinstance(spec, dict) and isinstance(spec.get("prompts"), list):
        rows = [{"prompt": p, **{k: spec[k] for k in ("response", "refusal") if k in spec}} for p in spec["prompts"]]
    else:
        raise ConfigError(f"suite data {name!r}: expected a list of rows or {{prompts: [...], response, refusal}}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not str(row.get("prompt", "")).strip():
            raise ConfigError(f"suite data {name!r}: row {i} has no prompt")
    return [{k: str(v) for k, v in row.items()} for row in rows]
