"""The sweep scheduler on a real (local) Ray with 2 CPUs and 2 fake GPUs, on the tiny model.

Defences are the counting test defences of ``tests/sweep_support.py`` (a plugin every worker
imports), so trainings are counted, not assumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import sweep_support
from sweep_support import count
from harness.lib.store import ResultStore
from harness.sweep.dag import build
from harness.sweep.grid import copy_spec, load_sweep_spec

FIXTURES = Path(__file__).parent / "fixtures" / "sweeps"
HARNESS = Path(sys.executable).parent / "harness"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    return sweep_support.start_ray(tmp_path_factory.mktemp("ray-session"))


def make_sweep(tiny_dir, out: Path, name: str = "tiny_2x3.yaml", **changes):
    spec, preset, _ = load_sweep_spec(str(FIXTURES / name))
    spec = copy_spec(spec, **{"isolate": "reuse", **changes})
    return build(spec, preset, output=str(out), models=[str(tiny_dir)])


def run(sweep, **kw):
    from harness.sweep.runner import SweepRunner

    runner = SweepRunner(sweep, progress=True, progress_interval=0.0, **kw)
    return runner, runner.run()


def read_state(out: Path) -> dict:
    return json.loads((out / "_sweep" / "state.json").read_text())


def overlaps(stages: list[dict]) -> list[tuple[str, str]]:
    out = []
    for i, a in enumerate(stages):
        for b in stages[i + 1:]:
            if a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]:
                out.append((a["label"], b["label"]))
    return out


def defences(*entries):
    return [{"name": "sweep_counting", **e} for e in entries]


def test_sweep_2x3_trains_each_defence_once(ray_cluster, tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    sweep = make_sweep(tiny_dir, out, defences=defences({"tag": "main-a", "sleep_s": 1.0},
                                                        {"tag": "main-b", "sleep_s": 1.0, "label": "b"}))
    t0 = time.time()
    _, summary = run(sweep)
    elapsed = time.time() - t0
    assert summary["records"] == {"ok": 6}, summary
    assert summary["stages_run"] == {"data": 1, "defence": 2, "pre_attack": 2, "cell": 6}
    # each defence trained exactly once (counted by the defence itself)
    assert count("main-a") == 1 and count("main-b") == 1
    assert count("main-a", "attempts") == 1 and count("main-b", "attempts") == 1
    store = ResultStore(out)
    recs = [store.load(c.trial_id) for c in sweep.cells]
    assert all(r.status == "ok" for r in recs)
    for rec in recs:  # every cell loaded the shared checkpoint; none trained it
        assert rec.defence_checkpoint.reused is True
        assert rec.defence_checkpoint.path.startswith(str(out / "checkpoints"))
    # pre-attack scores computed once per defended model and shared by its cells
    by_defence = {}
    for rec in recs:
        by_defence.setdefault(rec.defence_checkpoint.key, []).append(json.dumps(rec.scores.pre_attack))
    assert len(by_defence) == 2 and all(len(set(v)) == 1 and len(v) == 3 for v in by_defence.values())
    # stages really ran side by side on the 2 (fake) GPUs
    state = read_state(out)
    stages = [s for s in state["stages"].values() if s["status"] == "done"]
    assert len(stages) == 11
    assert overlaps([s for s in stages if s["kind"] == "defence"]), "the two defence trainings did not overlap"
    assert state["status"] == "finished" and state["counts"]["cell"]["done"] == 6
    err = capsys.readouterr().err
    assert "[sweep tiny-2x3] data 0/1 done" in err and "| defence 0/2 done, 2 pending |" in err
    assert "cell 6/6 done" in err and "left" in err

    # `harness status` reads the same folder
    from harness.cli import main

    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sweep tiny-2x3: finished" in text and "6 ok" in text
    assert "cell           6 done   0 running    0 pending   0 failed" in text

    # a second run trains nothing and rewrites no record
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.json")}
    ck_before = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")}
    _, summary2 = run(make_sweep(tiny_dir, out, defences=defences({"tag": "main-a", "sleep_s": 1.0},
                                                                  {"tag": "main-b", "sleep_s": 1.0, "label": "b"})))
    assert summary2["stages_run"] == {} and summary2["records"] == {"ok": 6}
    assert count("main-a", "attempts") == 1 and count("main-b", "attempts") == 1
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.json")} == before
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")} == ck_before
    print(f"2x3 sweep: {elapsed:.1f}s")


def test_failing_stages_are_retried_then_recorded(ray_cluster, tiny_dir, tmp_path):
    out = tmp_path / "out"
    sweep = make_sweep(tiny_dir, out, attack_lr=[8e-5], retries=1,
                       defences=defences({"tag": "f-ok"}, {"tag": "f-flaky", "fail": "once"},
                                         {"tag": "f-broken", "fail": "always"},
                                         {"tag": "f-attack", "fail_attack": True}))
    _, summary = run(sweep)
    assert summary["records"] == {"ok": 2, "error": 2}
    assert summary["status"] == "finished_with_errors"
    assert (count("f-ok", "attempts"), count("f-ok")) == (1, 1)
    assert (count("f-flaky", "attempts"), count("f-flaky")) == (2, 1)  # failed once, retried, then trained
    assert (count("f-broken", "attempts"), count("f-broken")) == (2, 0)  # 1 + retries attempts
    assert count("f-attack") == 1 and count("f-attack", "attack_attempts") == 2
    store = ResultStore(out)
    recs = {c.labels["defence"]: store.load(c.trial_id) for c in sweep.cells}
    broken = recs["sweep_counting[fail=always,tag=f-broken]"]
    assert broken.status == "error"
    assert broken.error.stage == "defence" and broken.error.attempts == 2
    assert "injected failure on attempt 2" in broken.error.message
    assert "Traceback" in broken.error.traceback and "RuntimeError" in broken.error.traceback
    attack = recs["sweep_counting[fail_attack=True,tag=f-attack]"]
    assert attack.status == "error" and attack.error.stage == "attack"
    assert attack.error.attempts == 2 and "injected attack failure" in attack.error.traceback
    state = read_state(out)
    by_label = {s["label"]: s for s in state["stages"].values()}
    failed = [s for s in state["stages"].values() if s["status"] == "failed"]
    cancelled = [s for s in state["stages"].values() if s["status"] == "cancelled"]
    assert sorted(s["kind"] for s in failed) == ["cell", "defence"]
    assert sorted(s["kind"] for s in cancelled) == ["cell", "pre_attack"]  # downstream of the broken defence
    assert all(s["attempts"] == 2 for s in failed)
    assert by_label["sweep_counting[fail=once,tag=f-flaky] seed 0"]["status"] == "done"


def test_api_scorer_scores_in_one_cpu_actor(ray_cluster, tiny_dir, tmp_path):
    """Every stage's API scoring goes to one CPU-only Ray actor (one rate limit for the sweep)."""
    pids_file = sweep_support.counter_dir() / "api_scorer.pids"
    pids_file.unlink(missing_ok=True)
    out = tmp_path / "out"
    sweep = make_sweep(tiny_dir, out, defences=["none"], attack_lr=[3e-5, 8e-5],
                       set={**sweep_support.FAST_SETS, "eval.harm_scorer": {"name": sweep_support.API_NAME}})
    _, summary = run(sweep)
    assert summary["records"] == {"ok": 2}
    store = ResultStore(out)
    for cell in sweep.cells:
        rec = store.load(cell.trial_id)
        post = rec.scores.post_attack["harmfulness"]
        assert post["mean"] == 0.5 and post["scorer"] == {"scorer": sweep_support.API_NAME, "requests": 4}
        assert rec.scores.pre_attack["harmfulness"]["mean"] == 0.5
    scorer_pids = set(pids_file.read_text().split())
    stage_pids = {str(h["pid"]) for s in read_state(out)["stages"].values() for h in s.get("history", [])}
    assert len(scorer_pids) == 1 and not scorer_pids & stage_pids  # 3 scoring calls, one actor, not a stage
    assert len(pids_file.read_text().split()) == 3  # 1 pre-attack + 2 post-attack evaluations


def _kill_yaml(tmp_path: Path) -> Path:
    data = yaml.safe_load((FIXTURES / "tiny_2x3.yaml").read_text())
    data.update(name="tiny-kill", isolate="reuse", plugins=["sweep_support"],
                defences=[{"name": "sweep_counting", "tag": "kill-a"}, "none"])
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_killed_driver_resumes_without_repeating_finished_cells(ray_cluster, tiny_dir, tmp_path):
    out = tmp_path / "out"
    spec_file = _kill_yaml(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.environ["PYTHONPATH"]}
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([str(HARNESS), "sweep", str(spec_file), "--model", str(tiny_dir), "--output", str(out),
                             "--address", ray_cluster["address"]], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=str(sweep_support.ROOT))
    store = ResultStore(out)
    deadline = time.time() + 180
    try:
        while time.time() < deadline:
            if any(r.status == "ok" for r in store.records()):
                break
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.1)
        else:
            pytest.fail("no record within 180 s: " + (tmp_path / "driver.log").read_text()[-3000:])
        from harness.sweep.status import collect

        live = collect(out)["sweep"]
        assert live["status"] == "running" and live["driver_alive"] is True
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()
    finished = {r.trial_id: (store.path(r.trial_id).read_bytes(), store.path(r.trial_id).stat().st_mtime_ns)
                for r in store.records() if r.status == "ok"}
    assert 1 <= len(finished) < 6
    from harness.sweep.status import collect

    assert collect(out)["sweep"]["status"].startswith("stopped")
    time.sleep(1.0)  # let Ray reap the dead driver's workers

    sweep = make_sweep_from(spec_file, tiny_dir, out)
    _, summary = run(sweep)
    assert summary["records"] == {"ok": 6}
    for tid, (content, mtime) in finished.items():  # finished before the kill: untouched
        assert store.path(tid).read_bytes() == content and store.path(tid).stat().st_mtime_ns == mtime
    state = read_state(out)
    for tid in finished:
        assert state["stages"][f"cell:{tid}"]["status"] == "skipped"
    assert summary["stages_run"].get("cell", 0) <= 6 - len(finished)
    assert count("kill-a") == 1  # the defence checkpoint (complete before any record) is reused
    for path in out.rglob("*.json"):  # nothing a later run would read is half-written
        if not path.name.endswith(".tmp"):
            json.loads(path.read_text())


def make_sweep_from(spec_file: Path, tiny_dir, out: Path):
    spec, preset, _ = load_sweep_spec(str(spec_file))
    return build(spec, preset, output=str(out), models=[str(tiny_dir)])


def test_second_driver_on_the_same_folder_is_refused(tmp_path, tiny_dir):
    from harness.sweep.runner import DriverLock, SweepError

    with DriverLock(tmp_path / "_sweep"):
        with pytest.raises(SweepError, match="another sweep driver"):
            with DriverLock(tmp_path / "_sweep"):
                pass
    with DriverLock(tmp_path / "_sweep"):  # released
        pass


def test_process_isolation_gives_every_stage_a_fresh_worker(ray_cluster, tiny_dir, tmp_path):
    out = tmp_path / "out"
    sweep = make_sweep(tiny_dir, out, isolate="process", attack_lr=[3e-5, 8e-5], defences=["none"])
    _, summary = run(sweep)
    assert summary["records"] == {"ok": 2}
    pids = [s["history"][-1]["pid"] for s in read_state(out)["stages"].values() if s["status"] == "done"]
    assert len(pids) == 4 and len(set(pids)) == 4
