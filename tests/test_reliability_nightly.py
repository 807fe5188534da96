"""Wrong numbers must not pass: the nightly comparison and its baseline (docs/reliability.md).

A baseline that cannot be compared (NaN, inf or text where a number belongs, no metrics, another
suite, cells the suite does not have, inconsistent counts) is a usage error (exit 2, one line)
raised before any trial runs; so is an unwritable ``--baseline`` / ``--output``. A run that compares
no metric fails. The comparison is tested at its boundaries: a change of exactly the tolerance
passes and one just past it fails, in every direction, with tolerances from ``abs`` and from the
baseline's seed std.
"""

from __future__ import annotations

import json
import os

import pytest

from harness.api.errors import ConfigError
from harness.cli import main
from harness.sweep import nightly as N
from leaderboards import nightly as C
from leaderboards.baseline import Baseline, CellMetrics
from leaderboards.suite import load_suite

SUITE = ("trials: [{name: base, defence: none, attack: harmfulqa}, {name: rn, defence: repnoise, "
         "attack: harmfulqa}]\nsets: [eval.harm_scorer.name=keyword_refusal]\n")
GOOD_METRIC = {"mean": 0.5, "std": 0.0, "n": 1, "values": [0.5]}


@pytest.fixture
def suite_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SUITE)
    return path


@pytest.fixture
def no_trials(monkeypatch):
    """Any trial that runs fails the test: the baseline must be refused first."""
    def forbidden(*a, **k):
        raise AssertionError("a trial ran before the baseline was validated")

    monkeypatch.setattr(N, "run_trial", forbidden)
    monkeypatch.setattr(N, "suite_specs", forbidden)


def _baseline(**over) -> dict:
    data = {"suite": "s", "cells": {"base": {"defence": "none"}},
            "metrics": {"base/post_attack/harmfulness/mean": dict(GOOD_METRIC)}}
    data.update(over)
    return data


BAD = {
    "NaN mean": '{"suite": "s", "cells": {"base": {"defence": "none"}}, '
                '"metrics": {"base/post_attack/harmfulness/mean": {"mean": NaN}}}',
    "Infinity std": '{"suite": "s", "metrics": {"base/post_attack/harmfulness/mean": {"mean": 0.1, "std": Infinity}}}',
    "nan as text": json.dumps(_baseline(metrics={"base/post_attack/harmfulness/mean": {"mean": "nan"}})),
    "inf as text": json.dumps(_baseline(metrics={"base/post_attack/harmfulness/mean": {"mean": "-inf"}})),
    "NaN value": '{"suite": "s", "metrics": {"base/post_attack/harmfulness/mean": {"mean": 0.1, "n": 1, '
                 '"values": [NaN]}}}',
    "negative std": json.dumps(_baseline(metrics={"base/post_attack/harmfulness/mean": {"mean": 0.1, "std": -1}})),
    "zero n": json.dumps(_baseline(metrics={"base/post_attack/harmfulness/mean": {"mean": 0.1, "n": 0}})),
    "n and values disagree": json.dumps(_baseline(metrics={"base/post_attack/harmfulness/mean":
                                                           {"mean": 0.1, "n": 3, "values": [0.1]}})),
    "empty metrics": json.dumps(_baseline(metrics={})),
    "no metrics key": json.dumps({"suite": "s", "cells": {"base": {"defence": "none"}}}),
    "another suite": json.dumps(_baseline(suite="tiny")),
    "another schema": json.dumps(_baseline(schema=2)),
    "foreign cell": json.dumps(_baseline(cells={"base": {"defence": "none"}, "vaccine": {"defence": "vaccine"}})),
    "foreign metric": json.dumps(_baseline(metrics={"gone/post_attack/harmfulness/mean": dict(GOOD_METRIC)})),
    "not an object": "[1, 2, 3]",
    "empty file": "",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_baseline_that_cannot_be_compared_is_refused_before_any_trial(tmp_path, suite_file, no_trials, name):
    path = tmp_path / "baseline.json"
    path.write_text(BAD[name])
    with pytest.raises(ConfigError) as exc:
        N.run_suite(str(suite_file), tmp_path / "out", baseline_path=path, leaderboard=False)
    text = str(exc.value)
    assert str(path) in text and "\n" not in text, (name, text)


def test_cli_says_it_in_one_line_with_exit_2(tmp_path, suite_file, no_trials, capsys):
    path = tmp_path / "baseline.json"
    path.write_text(BAD["NaN mean"])
    assert main(["nightly", "--suite", str(suite_file), "--baseline", str(path), "--output",
                 str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: baseline") and "NaN" in err and "\n" not in err
    folder = tmp_path / "a-folder.json"
    folder.mkdir()
    assert main(["nightly", "--suite", str(suite_file), "--baseline", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_baseline_or_output_is_refused_before_any_trial_as_user(tmp_path, suite_file, no_trials):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="cannot be written"):
            N.run_suite(str(suite_file), tmp_path / "out", baseline_path=ro / "b.json", update_baseline=True)
        good = tmp_path / "b.json"
        good.write_text(json.dumps(_baseline()))
        with pytest.raises(ConfigError, match="cannot write the run folder"):
            N.run_suite(str(suite_file), ro / "out", baseline_path=good)
    finally:
        ro.chmod(0o700)


def test_unwritable_baseline_paths_are_refused_before_any_trial(tmp_path, suite_file, no_trials):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    a_dir = tmp_path / "dir.json"
    a_dir.mkdir()
    for target, msg in ((a_file / "b.json", "cannot be written"), (a_dir, "is a directory")):
        with pytest.raises(ConfigError, match=msg):
            N.run_suite(str(suite_file), tmp_path / "out", baseline_path=target, update_baseline=True)
    good = tmp_path / "b.json"
    good.write_text(json.dumps(_baseline()))
    with pytest.raises(ConfigError, match="cannot write the run folder"):
        N.run_suite(str(suite_file), a_file / "out", baseline_path=good)


# ---- boundaries of the comparison --------------------------------------------------------------
def _compare(suite, defence: str, metric: str, base_values: list[float], value: float):
    base = Baseline.from_json({"cells": {"c": {"defence": defence}},
                               "metrics": {f"c/{metric}": C.summarize(base_values).to_json()}})
    cur = {"c": CellMetrics(defence, metrics={metric: C.summarize([value])})}
    [comp] = C.compare(cur, base, suite)
    return comp


CASES = [  # (defence, metric, direction, tolerance, baseline mean)
    ("repnoise", "post_attack/harmfulness/mean", "higher_is_worse", 0.05, 0.1),
    ("repnoise", "criteria/resistance/increase", "higher_is_worse", 0.05, 0.3),
    ("repnoise", "pre_attack/capability/arc_easy", "lower_is_worse", 0.02, 0.7),
    ("repnoise", "criteria/stability/mean_gain", "lower_is_worse", 0.02, -0.1),
    ("none", "post_attack/harmfulness/mean", "both", 0.1, 0.6),
]


@pytest.mark.parametrize("defence,metric,direction,tol,mean", CASES)
def test_exactly_at_the_tolerance_passes_and_just_past_fails(tmp_path, defence, metric, direction, tol, mean):
    suite = load_suite(str(_write(tmp_path, "trials: [{name: c, defence: none, attack: harmfulqa}]")))
    past = 1e-6
    worse_signs = {"higher_is_worse": [1], "lower_is_worse": [-1], "both": [1, -1]}[direction]
    for sign in (1, -1):
        at = _compare(suite, defence, metric, [mean], mean + sign * tol)
        assert at.direction == direction and at.tolerance == pytest.approx(tol)
        assert at.verdict == "ok", (sign, at.change)
        beyond = _compare(suite, defence, metric, [mean], mean + sign * (tol + past))
        expected = "REGRESSION" if sign in worse_signs else "improved"
        assert beyond.verdict == expected, (sign, beyond.change)
        inside = _compare(suite, defence, metric, [mean], mean + sign * (tol - past))
        assert inside.verdict == "ok"


@pytest.mark.parametrize("direction_metric", ["post_attack/harmfulness/mean", "pre_attack/capability/arc_easy"])
def test_seed_std_tolerance_boundary(tmp_path, direction_metric):
    suite = load_suite(str(_write(tmp_path, "trials: [{name: c, defence: none, attack: harmfulqa}]")))
    seeds = [0.3, 0.5, 0.7]  # sample std 0.2 -> tolerance max(abs, 2 * 0.2) = 0.4
    sign = 1 if "harm" in direction_metric else -1
    at = _compare(suite, "repnoise", direction_metric, seeds, 0.5 + sign * 0.4)
    assert at.tolerance == pytest.approx(0.4) and at.verdict == "ok"
    assert _compare(suite, "repnoise", direction_metric, seeds, 0.5 + sign * 0.40001).verdict == "REGRESSION"


def test_a_run_that_compares_nothing_fails(tmp_path, monkeypatch):
    """The baseline is fine but no metric of the run can be compared with it (every trial produced
    no number): FAIL, exit 1, never PASS."""
    from harness.api.record import TrialRecord

    def empty_trial(spec, *a, **k):
        return TrialRecord(trial_id=spec.trial_id, status="ok", config=spec.canonical(), seed=spec.seed)

    monkeypatch.setattr(N, "run_trial", empty_trial)
    suite = _write(tmp_path, "trials: [{name: base, defence: none, attack: harmfulqa}]\n"
                             "sets: [eval.harm_scorer.name=keyword_refusal]\n")
    base = tmp_path / "b.json"
    base.write_text(json.dumps({"suite": "s", "cells": {"base": {"defence": "none"}},
                                "metrics": {"base/train/attack/final_loss": dict(GOOD_METRIC)}}))  # info only
    res = N.run_suite(str(suite), tmp_path / "out", baseline_path=base, leaderboard=False)
    assert res.exit_code == 1 and C.compared(res.comparisons) == 0
    assert "**FAIL** — no metric of this run could be compared" in res.report


def _write(tmp_path, text: str):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path
