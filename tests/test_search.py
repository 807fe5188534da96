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


def test_answer_loss_harm_is_the_probability_of_a_harmful_token(tiny_dir, tmp_path):
    import math

    r = record("a", 0.0, 0.5, 0.5)
    r.scores.post_attack["answer_loss"] = {"harmful_loss": 2.0, "harmless_loss": 1.0}
    o = outcome(r, {}, epsilon=0.1, harm_measure="answer_loss")
    assert o.harm == pytest.approx(math.exp(-2.0)) and o.feasible and o.objective == pytest.approx(math.exp(-2.0))
    assert outcome(record("b", 0.0, 0.5, 0.5), {}, 0.1, "answer_loss").status == "unmeasured"  # not measured
    plain = Search("smoke", "none", "harmfulqa", SearchSettings(space={"harmfulqa": SPACE}), tmp_path, sets=FAST,
                   model=str(tiny_dir))
    loss = Search("smoke", "none", "harmfulqa", SearchSettings(harm="answer_loss", space={"harmfulqa": SPACE}),
                  tmp_path, sets=FAST, model=str(tiny_dir))
    assert "answer_loss" not in plain.base.eval.extra and "answer_loss" in loss.base.eval.extra
    assert loss.id != plain.id


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


def _subparser(cmd):
    from harness.cli.main import build_parser

    p = build_parser([cmd])
    return next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction").choices[cmd]


def test_sweep_and_search_share_their_file_options():
    """harness/cli/grid_options.py defines SPEC, --preset, --model, --set, --output, --address, --dry-run and
    --no-progress once for both commands; each keeps its meaning of --preset and --model."""
    sweep, search = _subparser("sweep"), _subparser("search")
    argv = ["f.yaml", "--set", "a=1", "--set", "b=2", "--output", "o", "--address", "ray://x", "--dry-run",
            "--no-progress", "--model", "m1"]
    a, b = sweep.parse_args(argv + ["--model", "m2"]), search.parse_args(argv)
    for ns in (a, b):
        assert (ns.spec, ns.sets, ns.output, ns.address, ns.dry_run, ns.no_progress) == \
            ("f.yaml", ["a=1", "b=2"], "o", "ray://x", True, True)
    assert (a.model, a.preset) == (["m1", "m2"], None)       # the models axis; the file's preset
    assert (b.model, b.preset) == ("m1", "smoke")            # one model; the preset of --defence/--attack
    helps = lambda p: {o: act.help for act in p._actions for o in act.option_strings}
    for opt in ("--set", "--address"):
        assert helps(sweep)[opt] == helps(search)[opt]
    assert {"--storage", "--num-cpus", "--gpus"} <= set(helps(sweep)) and not {"--storage", "--gpus"} & set(helps(search))
    assert {"--budget", "--epsilon", "--harm"} <= set(helps(search)) and "--budget" not in helps(sweep)


def test_search_file_takes_model_and_seed_from_the_command_line(tmp_path, tiny_dir, capsys):
    f = tmp_path / "s.yaml"
    f.write_text("preset: smoke\nattacks: [lora]\nsearch: {budget: 2}\n")
    assert main(["search", str(f), "--model", str(tiny_dir), "--seed", "3", "--dry-run"]) == 0
    example = json.loads(capsys.readouterr().out)["example"]
    assert f"--model {tiny_dir}" in example and "--seed 3" in example


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


# ---- on a local Ray with 2 CPUs and 2 fake GPUs (as the sweep's tests: tests/sweep_support.py) ----------
@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import sweep_support

    return sweep_support.start_ray(tmp_path_factory.mktemp("ray-session"))


def _interval(rec: dict) -> tuple[float, float]:
    from datetime import datetime

    return (datetime.fromisoformat(rec["started_at"]).timestamp(), datetime.fromisoformat(rec["finished_at"]).timestamp())


def test_two_fake_gpus_run_trials_at_once_on_one_defended_checkpoint(ray_cluster, tiny_dir, tmp_path):
    """concurrency 2 x 1 GPU per trial: two trials overlap, each on its own GPU; the counting defence
    (tests/sweep_support.py) is trained once, by the driver, and every trial reuses its checkpoint."""
    import sweep_support

    tag = "search-gpus"
    settings = SearchSettings(budget=4, concurrency=2, num_gpus=1, num_cpus=1, space={"harmfulqa": SPACE})
    s = Search("smoke", sweep_support.NAME, "harmfulqa", settings, tmp_path / "out", model=str(tiny_dir),
               sets=FAST + [f"defence.tag={tag}"])
    summary = s.run(address=ray_cluster["address"])
    assert summary["n_trials"] == 4
    assert sweep_support.count(tag) == 1 and sweep_support.count(tag, "attempts") == 1
    entries = [json.loads(line) for line in s.trials_file.read_text().splitlines()]
    recs = [json.loads((tmp_path / "out" / f"{e['trial_id']}.json").read_text()) for e in entries]
    assert all(r["status"] == "ok" for r in recs)
    assert len({r["defence_checkpoint"]["path"] for r in recs}) == 1
    assert all(r["defence_checkpoint"]["reused"] for r in recs)
    assert all(len(e["worker"]["gpus"]) == 1 and e["worker"]["gpus"][0] in ("0", "1") for e in entries)
    spans = [_interval(r) for r in recs]
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)
             if spans[i][0] < spans[j][1] and spans[j][0] < spans[i][1]]
    assert pairs, f"no two trials ran at once: {spans}"
    for i, j in pairs:  # trials that ran at once held different GPUs
        assert entries[i]["worker"]["gpus"] != entries[j]["worker"]["gpus"]


def test_killed_search_driver_resumes_the_rest_of_the_budget(ray_cluster, tiny_dir, tmp_path):
    """A real `harness search` process joined to the Ray cluster is SIGKILLed after its first finished
    trial; the same search run again keeps the finished trials (records untouched), reuses the
    defended checkpoint and runs only the rest of the budget."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml

    import sweep_support

    tag = "search-kill"
    budget = 4
    spec = {"preset": "smoke", "plugins": ["sweep_support"], "defences": [{"name": sweep_support.NAME, "tag": tag}],
            "attacks": ["harmfulqa"], "set": dict(x.split("=", 1) for x in FAST),
            "search": {"budget": budget, "space": {"harmfulqa": SPACE}}}
    spec["set"] = {k: yaml.safe_load(v) for k, v in spec["set"].items()}
    f = tmp_path / "search.yaml"
    f.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    harness = Path(sys.executable).parent / "harness"
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([str(harness), "search", str(f), "--model", str(tiny_dir), "--output", str(out),
                             "--address", ray_cluster["address"], "--no-progress"], stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ), cwd=str(sweep_support.ROOT))
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            files = list(out.glob("_search/*/trials.jsonl"))
            if files and files[0].read_text().strip():
                break
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.1)
        else:
            pytest.fail("no finished trial within 120 s: " + (tmp_path / "driver.log").read_text()[-3000:])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    time.sleep(1.0)  # let Ray end the dead driver's trial workers
    [search] = searches_from_file(str(f), output=str(out), model=str(tiny_dir))  # the same options: the same search
    assert search.folder == files[0].parent
    done = search.load_outcomes()
    assert 1 <= len(done) < budget
    kept = {o.trial_id: ((out / f"{o.trial_id}.json").read_bytes(), (out / f"{o.trial_id}.json").stat().st_mtime_ns)
            for o in done}
    # the summary written before the first trial names the search (and its epsilon) for the worst-case table
    assert json.loads((search.folder / "summary.json").read_text())["epsilon"] == search.settings.epsilon
    result = search.run(address=ray_cluster["address"])
    assert result["n_trials"] == budget
    lines = [json.loads(x) for x in search.trials_file.read_text().splitlines() if x.strip()]
    assert len({x["trial_id"] for x in lines}) == len(lines) == budget  # only the rest ran; nothing twice
    for tid, (content, mtime) in kept.items():
        path = out / f"{tid}.json"
        assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime
    assert sweep_support.count(tag) == 1  # the killed driver's defended checkpoint was complete and reused
    for t in result["trials"]:
        assert json.loads((out / f"{t['trial_id']}.json").read_text())["status"] == "ok"
