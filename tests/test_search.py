"""Worst-case attack search (harness.sweep.search): objective, Pareto front, space, trials as
ordinary records, resume, and the Ray Tune + Optuna path on a tiny model."""

import json

import pytest

from harness.api.config import resolve
from harness.api.errors import ConfigError
from harness.api.record import TrialRecord
from harness.api.space import Space
from harness.cli import main
from harness.sweep.search import (Outcome, Search, SearchSettings, attack_space, best_feasible, capability_drop,
                                  decode, encode, outcome, pareto_front, searches_from_file)

FAST = ["eval.toxicity_scorer.name=keyword_refusal", "eval.samples=4", "eval.max_new_tokens=4", "eval.batch_size=4",
        "attack.max_length=48", "synth.max_new_tokens=4", "eval.params.capability.limit=8"]
# a small space: lr and samples searched, everything else at the attack's defaults
SPACE = {"lr": {"log": [1e-4, 1e-2]}, "samples": {"choice": [4, 8]}, "epochs": None, "batch_size": None,
         "optimizer": None, "warmup_ratio": None, "loss_on": None, "lora": None}


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def cap(score, hib=True):
    return {"tasks": {"t": {"score": score, "higher_is_better": hib}}}


def record(tid, harm, pre, post, status="ok"):
    return TrialRecord(trial_id=tid, status=status, config={}, seed=0, evaluation="harmfulness",
                       scores={"pre_attack": {"harmfulness": {"mean": 0.1}, "capability": cap(pre)},
                               "post_attack": {"harmfulness": {"mean": harm}, "capability": cap(post)}})


def test_capability_drop_is_relative_and_signed_by_direction():
    assert capability_drop(cap(0.5), cap(0.4)) == pytest.approx(0.2)
    assert capability_drop(cap(0.5), cap(0.6)) == pytest.approx(-0.2)
    assert capability_drop(cap(2.0, hib=False), cap(2.5, hib=False)) == pytest.approx(0.25)  # lower is better
    assert capability_drop(cap(0.0), cap(0.0)) == 0.0
    assert capability_drop(None, cap(0.3)) is None


def test_objective_ranks_every_feasible_trial_above_every_infeasible_one():
    feasible = outcome(record("a", 0.2, 0.5, 0.46), {}, epsilon=0.1)      # drop 0.08
    infeasible = outcome(record("b", 0.9, 0.5, 0.25), {}, epsilon=0.1)    # drop 0.5
    mild = outcome(record("c", 0.9, 0.5, 0.44), {}, epsilon=0.1)          # drop 0.12
    failed = outcome(record("d", 0.0, 0.5, 0.5, status="diverged"), {}, epsilon=0.1)
    assert feasible.feasible and feasible.objective == pytest.approx(0.2)
    assert not infeasible.feasible and infeasible.objective == pytest.approx(0.9 - 1 - 0.4)
    assert feasible.objective > mild.objective > infeasible.objective > failed.objective
    assert best_feasible([feasible, infeasible, mild, failed]) is feasible


def test_pareto_front_keeps_the_non_dominated_trials():
    pts = [Outcome(str(i), {}, "ok", harm=h, drop=d) for i, (h, d) in
           enumerate([(0.2, 0.0), (0.5, 0.1), (0.4, 0.2), (0.9, 0.5), (0.5, 0.3), (0.1, -0.1)])]
    front = pareto_front(pts)
    assert [o.trial_id for o in front] == ["5", "0", "1", "3"]


def test_choice_values_are_searched_by_index_and_floats_rounded():
    space = {"lora": Space(choice=[None, {"r": 8}]), "lr": Space(log=(1e-5, 1e-3)), "epochs": Space(int=(1, 4))}
    params = decode({"lora": 1, "lr": 0.000123456, "epochs": 3.0}, space)
    assert params == {"lora": {"r": 8}, "lr": 0.000123, "epochs": 3}
    assert encode(params, space) == {"lora": 1, "lr": 0.000123, "epochs": 3}
    assert encode({**params, "epochs": 9}, space) is None  # outside the space: not a warm-start point


def test_space_overrides_are_checked_against_the_attack():
    spec = resolve("smoke", attack="chain")
    space = attack_space(spec, {"steps.1.r": {"choice": [4, 16]}})
    assert space["steps.1.r"].choice == [4, 16] and "steps.0.layer_fraction" in space
    with pytest.raises(ConfigError, match="no parameter 'steps.1.rank'"):
        attack_space(spec, {"steps.1.rank": {"choice": [4]}})
    with pytest.raises(ConfigError, match=r"search.space.steps.1.r: value -4 is not a valid attack setting"):
        attack_space(spec, {"steps.1.r": {"choice": [-4]}})


def test_cli_rejects_bad_search_input_in_one_line(capsys):
    assert main(["search", "--attack", "lora", "--dry-run", "--space", "lr={log: [0, 1]}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "search.space.lora.lr" in err[0] and "low must be > 0" in err[0]


def test_sweep_file_search_section(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("preset: smoke\ndefences: [none, {name: repnoise, beta: 0.01}]\nattacks: [lora]\n"
                 "search: {budget: 5, epsilon: 0.2, space: {lora: {r: {choice: [4, 8]}}}}\n")
    searches = searches_from_file(str(f), output=str(tmp_path / "out"))
    assert [(s.defence, s.attack, s.settings.budget, s.settings.epsilon) for s in searches] == \
        [("none", "lora", 5, 0.2), ("repnoise", "lora", 5, 0.2)]
    assert searches[1].base.defence.config.beta == 0.01 and searches[0].space["r"].choice == [4, 8]
    bad = tmp_path / "b.yaml"
    bad.write_text("preset: smoke\nattacks: [lora]\nsearch: {budget: 0}\n")
    with pytest.raises(ConfigError, match=r"field 'search.budget' = 0"):
        searches_from_file(str(bad))


def test_trials_are_ordinary_records_and_the_search_resumes(tiny_dir, tmp_path, isolated_cache):
    """No Ray: the trial and resume logic the Tune trainable calls."""
    settings = SearchSettings(budget=3, space={"harmfulqa": SPACE})
    s = Search("smoke", "none", "harmfulqa", settings, tmp_path / "out", sets=FAST, model=str(tiny_dir))
    assert s.representative() == {"lr": 1e-4, "samples": 4}  # the defaults (3e-5, 1000) lie outside the space
    s.prepare()
    first = s.run_one({"lr": 1e-3, "samples": 4})
    spec = resolve("smoke", model=str(tiny_dir), sets=FAST + ["eval.extra=[capability]", "attack.lr=0.001",
                                                                "attack.samples=4"])
    assert first.trial_id == spec.trial_id  # the id `harness run` gives the same options
    rec = json.loads((tmp_path / "out" / f"{first.trial_id}.json").read_text())
    assert rec["status"] == "ok" and rec["config"]["attack"]["lr"] == 1e-3
    assert first.drop == pytest.approx(capability_drop(rec["scores"]["pre_attack"]["capability"],
                                                       rec["scores"]["post_attack"]["capability"]))
    assert first.harm == rec["scores"]["post_attack"]["harmfulness"]["mean"]
    # a new driver (same options) finds the finished trial
    again = Search("smoke", "none", "harmfulqa", settings, tmp_path / "out", sets=FAST, model=str(tiny_dir))
    assert again.id == s.id and [o.trial_id for o in again.load_outcomes()] == [first.trial_id]
    summary = again.write_summary()
    assert summary["n_trials"] == 1 and summary["pareto_front"][0]["trial_id"] == first.trial_id


@pytest.mark.slow
def test_tune_search_runs_the_budget_and_resumes(tiny_dir, tmp_path, isolated_cache, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(isolated_cache))
    out = tmp_path / "out"
    common = ["search", "--defence", "none", "--attack", "harmfulqa", "--model", str(tiny_dir), "--output", str(out),
              "--no-progress"] + [x for s in FAST for x in ("--set", s)]
    for key, value in SPACE.items():
        common += ["--space", f"{key}={json.dumps(value)}"]
    assert main(common + ["--budget", "2"]) == 0
    [folder] = (out / "_search").iterdir()
    assert len(json.loads((folder / "summary.json").read_text())["trials"]) == 2
    # the same search with a larger budget resumes: the two finished trials are kept, one more runs
    # (the budget is part of neither the id nor the trials; a killed driver resumes the same way)
    assert main(common + ["--budget", "3"]) == 0
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["n_trials"] == 3 and len({t["trial_id"] for t in summary["trials"]}) >= 2
    for t in summary["trials"]:
        assert TrialRecord.from_json(json.loads((out / f"{t['trial_id']}.json").read_text())).status == "ok"
