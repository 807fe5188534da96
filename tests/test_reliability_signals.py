"""Interrupted and concurrent runs, with real signals on real processes (``harness run`` in a subprocess).

Each test starts ``tests/fault_driver.py cli -- run ...`` (the real CLI on the tiny model, with the
test defence), pauses it at a stage, and then sends SIGINT, SIGTERM or SIGKILL, or starts a second
process on the same trial or the same defended checkpoint. What must hold (docs/reliability.md):
SIGINT/SIGTERM -> record ``interrupted`` with its stage, exit 130/143, one line, no traceback; a
killed run shows as ``dead`` in ``harness status``; a live one as running; a second run of a trial
waits and then skips; a second trial on the same defence waits and then reuses the checkpoint; a
stale ``.partial-*`` copy of a checkpoint is removed on the next run of its key.
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

import fault_driver
from harness.lib.locks import lock_held, lock_path
from harness.sweep.status import collect, format_status

DRIVER = Path(fault_driver.__file__)
TD = fault_driver.TEST_DEFENCE


def _argv(tiny_dir, out: Path, *extra: str) -> list[str]:
    sets = [x for s in fault_driver.FAULT_SETS for x in ("--set", s)]
    return ["run", "--defence", TD, "--attack", "harmfulqa", "--model", str(tiny_dir), "--output", str(out),
            "--no-progress", *sets, *extra]


class Run:
    """A ``harness run`` subprocess; its stderr goes to ``<tmp>/<name>.err`` (readable while it runs)."""

    def __init__(self, tmp_path, tiny_dir, out: Path, *extra: str, pause_at: str | None = None,
                 fail_at: str | None = None, name: str = "a"):
        self.ready, self.go = tmp_path / f"{name}.ready", tmp_path / f"{name}.go"
        self.err_path = tmp_path / f"{name}.err"
        cmd = [sys.executable, str(DRIVER), "cli"]
        if pause_at:
            cmd += ["--pause-at", pause_at, "--ready", str(self.ready), "--go", str(self.go)]
        if fail_at:
            cmd += ["--fail-at", fail_at]
        cmd += ["--", *_argv(tiny_dir, out, *extra)]
        env = {**os.environ, "PYTHONPATH": str(DRIVER.parent.parent), "HARNESS_CACHE": str(tmp_path / "cache")}
        self.err_file = open(self.err_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=self.err_file, text=True)
        self.pid = self.proc.pid

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def wait_ready(self, timeout: float = 180) -> None:
        _wait_for(lambda: self.ready.exists(), self, timeout, f"{self.ready.name}")

    def wait_err(self, text: str, timeout: float = 180) -> None:
        _wait_for(lambda: text in self.err, self, timeout, repr(text))

    def finish(self, timeout: float = 300) -> int:
        self.out, _ = self.proc.communicate(timeout=timeout)
        self.err_file.close()
        return self.proc.returncode

    def signal(self, sig) -> None:
        os.kill(self.pid, sig)


def _wait_for(cond, run: Run, timeout: float, what: str) -> None:
    t0 = time.time()
    while not cond():
        if run.proc.poll() is not None:
            raise AssertionError(f"process ended before {what}: {run.err[-3000:]}")
        if time.time() - t0 > timeout:
            run.proc.kill()
            raise AssertionError(f"timed out waiting for {what}: {run.err[-3000:]}")
        time.sleep(0.05)


def _record(out: Path) -> dict:
    files = [p for p in out.glob("*.json")]
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("sig,code,stage", [(signal.SIGINT, 130, "attack"), (signal.SIGTERM, 143, "pre_attack"),
                                             (signal.SIGTERM, 143, "defence")])
def test_signal_records_interrupted_and_exits_in_one_line(tiny_dir, tmp_path, sig, code, stage):
    out = tmp_path / "results"
    run = Run(tmp_path, tiny_dir, out, pause_at=stage)
    run.wait_ready()
    rec = _record(out)
    assert rec["status"] == "running" and rec["owner"]["pid"] == run.pid
    info = collect(out)  # alive while it runs
    assert info["records"] == {"running": 1} and info["running_records"][0]["state"] == "alive"
    run.signal(sig)
    assert run.finish(120) == code, run.err[-3000:]
    assert "Traceback" not in run.err
    last = [line for line in run.err.strip().splitlines() if line.strip()][-1]
    assert last == f"interrupted: interrupted by {signal.Signals(sig).name} (exit {code})"
    rec = _record(out)
    assert rec["status"] == "interrupted"
    assert rec["error"]["type"] == "Interrupted" and rec["error"]["stage"] == stage
    assert rec["finished_at"]
    assert lock_held(lock_path(out, rec["trial_id"])) is False  # released on the way out
    assert collect(out)["records"] == {"interrupted": 1}


def test_sigkill_leaves_a_dead_run_that_status_names(tiny_dir, tmp_path, capsys):
    from harness.cli import main

    out = tmp_path / "results"
    run = Run(tmp_path, tiny_dir, out, pause_at="post_attack")
    run.wait_ready()
    run.signal(signal.SIGKILL)
    run.finish(60)
    rec = _record(out)
    assert rec["status"] == "running"  # the process had no chance to say anything
    info = collect(out)
    assert info["records"] == {"dead": 1} and not info["running_records"]
    assert f"pid {run.pid}" in info["dead"][0]["reason"] and "no longer exists" in info["dead"][0]["reason"]
    text = format_status(info)
    assert "1 dead" in text and f"dead: {rec['trial_id']}" in text
    assert main(["status", str(out)]) == 0
    assert "dead:" in capsys.readouterr().out
    # the leaderboard's status line says it too
    from harness.lib.store import load_records
    from harness.sweep.status import record_warnings

    assert any("is dead" in line for line in record_warnings(load_records(out), out))
    # another host's record: dead when its heartbeat is stale, alive when fresh
    path = out / f"{rec['trial_id']}.json"
    original = path.read_text()
    for age, expected in ((10_000, "dead"), (5, "running")):
        other = {**rec, "owner": {**rec["owner"], "host": "some-other-host", "run_id": "elsewhere",
                                   "heartbeat": time.time() - age}}
        path.write_text(json.dumps(other))
        assert expected in collect(out)["records"], age
    path.write_text(original)
    # the rerun replaces the dead record; the dead run stays in the history
    again = Run(tmp_path, tiny_dir, out, name="again")
    assert again.finish() == 0, again.err[-3000:]
    rec = _record(out)
    assert rec["status"] == "ok"
    assert [a["status"] for a in rec["attempts"]] == ["dead"]
    assert f"pid {run.pid}" in rec["attempts"][0]["note"]


def test_forced_rerun_interrupted_or_failed_keeps_the_finished_result(tiny_dir, tmp_path):
    out = tmp_path / "results"
    first = Run(tmp_path, tiny_dir, out, name="first")
    assert first.finish() == 0, first.err[-3000:]
    ok = _record(out)
    samples = out / ok["samples_file"]
    before = samples.read_bytes()
    # forced rerun, stopped by SIGTERM after its post_attack rewrote the samples file
    forced = Run(tmp_path, tiny_dir, out, "--force", pause_at="finish", name="forced")
    forced.wait_ready()
    during = _record(out)
    assert during["status"] == "ok" and during["attempts"][-1]["status"] == "running"
    assert collect(out)["rerunning"], "a forced rerun in progress is listed"
    forced.signal(signal.SIGTERM)
    assert forced.finish(120) == 143 and "Traceback" not in forced.err
    assert "is kept" in forced.err  # the CLI says the finished result was kept
    after = _record(out)
    assert after["status"] == "ok" and after["scores"] == ok["scores"] and after["started_at"] == ok["started_at"]
    assert [a["status"] for a in after["attempts"]] == ["interrupted"]
    assert after["attempts"][0]["error"]["stage"] == "finish"
    assert samples.read_bytes() == before
    # a forced rerun that fails: the same
    failing = Run(tmp_path, tiny_dir, out, "--force", fail_at="attack", name="failing")
    assert failing.finish() == 1
    assert "Traceback" not in failing.err and "is kept" in failing.err
    after = _record(out)
    assert after["status"] == "ok" and after["scores"] == ok["scores"]
    assert [a["status"] for a in after["attempts"]] == ["interrupted", "error"]
    assert "failure injected in attack" in after["attempts"][1]["error"]["message"]
    assert samples.read_bytes() == before


def test_forced_rerun_sigkilled_after_rewriting_samples_restores_them_next_run(tiny_dir, tmp_path):
    out = tmp_path / "results"
    first = Run(tmp_path, tiny_dir, out, name="first")
    assert first.finish() == 0, first.err[-3000:]
    ok = _record(out)
    samples = out / ok["samples_file"]
    before = samples.read_bytes()
    forced = Run(tmp_path, tiny_dir, out, "--force", pause_at="finish", name="forced")
    forced.wait_ready()
    samples.write_bytes(b"other generations of the forced rerun\n")  # as if they had come out differently
    forced.signal(signal.SIGKILL)
    forced.finish(60)
    assert samples.read_bytes() != before
    rec = _record(out)
    assert rec["status"] == "ok" and rec["attempts"][-1]["status"] == "running"
    assert collect(out)["rerunning"] == []  # its process is gone: not listed as rerunning
    nxt = Run(tmp_path, tiny_dir, out, name="next")  # not forced: skips, but settles the kept samples first
    assert nxt.finish() == 0, nxt.err[-3000:]
    assert samples.read_bytes() == before
    assert not list(samples.parent.glob(".*kept-*"))
    rec = _record(out)
    assert rec["status"] == "ok" and rec["scores"] == ok["scores"]


def test_two_runs_of_one_trial_and_of_one_defence(tiny_dir, tmp_path):
    """A holds both locks (paused in its defence stage); B is the same trial, C another attack on the
    same defended model. B waits and then skips; C waits and then reuses A's checkpoint."""
    out = tmp_path / "results"
    a = Run(tmp_path, tiny_dir, out, pause_at="defence", name="a")
    a.wait_ready()
    b = Run(tmp_path, tiny_dir, out, name="b")
    c = Run(tmp_path, tiny_dir, out, "--set", "attack.lr=0.0002", name="c")
    b.wait_err("waiting for it to end")
    c.wait_err("then reusing it")
    assert f"is being run by pid {a.pid}" in b.err and f"is being trained by pid {a.pid}" in c.err
    a.go.write_text("go")
    assert a.finish() == 0, a.err[-3000:]
    assert b.finish() == 0, b.err[-3000:]
    assert c.finish() == 0, c.err[-3000:]
    assert "already finished meanwhile" in b.err and "(already finished: skipped)" in b.out
    records = {json.loads(p.read_text())["config"]["attack"]["lr"]: json.loads(p.read_text())
               for p in out.glob("*.json")}
    assert len(records) == 2
    rec_c = records[0.0002]
    assert rec_c["status"] == "ok" and rec_c["defence_checkpoint"]["reused"] is True
    assert any(n.startswith("defence: waited") and n.endswith("reused it") for n in rec_c["notes"])
    rec_a = next(r for lr, r in records.items() if lr != 0.0002)
    assert rec_a["status"] == "ok" and rec_a["defence_checkpoint"]["reused"] is False and not rec_a["attempts"]


SWEEP_DEFENCE_TASK = """
import json, sys
sys.path.insert(0, sys.argv[1])
import fault_driver
fault_driver.setup_process()
from harness.pipeline.state import TrialPaths
from harness.sweep.worker import stage_defence
out, model = sys.argv[2], sys.argv[3]
spec = fault_driver.make_spec(model)
storage = TrialPaths.of(out, None).checkpoints
res = stage_defence(spec, out, storage, {"kind": "defence", "id": "defence:test"})
print(json.dumps({"key": spec.defence_key(), "checkpoint": res["checkpoint"]}))
"""


def test_sweep_defence_task_and_harness_run_do_not_both_train(tiny_dir, tmp_path):
    """A ``harness run`` (A) pauses while it trains the defended checkpoint, holding the defence
    key's lock; a sweep's defence task (B, ``harness.sweep.worker.stage_defence`` in its own process)
    for the same defended model waits for that lock, then reuses A's checkpoint instead of training
    it a second time."""
    out = tmp_path / "results"
    a = Run(tmp_path, tiny_dir, out, pause_at="defence", name="a")
    a.wait_ready()
    env = {**os.environ, "PYTHONPATH": str(DRIVER.parent.parent), "HARNESS_CACHE": str(tmp_path / "cache")}
    b_err = open(tmp_path / "b.err", "w")
    b = subprocess.Popen([sys.executable, "-c", SWEEP_DEFENCE_TASK, str(DRIVER.parent), str(out), str(tiny_dir)],
                         env=env, stdout=subprocess.PIPE, stderr=b_err, text=True)
    try:
        t0 = time.time()
        while f"is being trained by pid {a.pid}" not in (tmp_path / "b.err").read_text():
            assert b.poll() is None, (tmp_path / "b.err").read_text()[-3000:]
            assert time.time() - t0 < 180, "the sweep task did not wait for the defence lock"
            time.sleep(0.05)
        key_dirs = [p for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")]
        assert not any((p / ".complete").exists() for p in key_dirs)  # nobody finished it yet
        a.go.write_text("go")
        assert a.finish() == 0, a.err[-3000:]
        b_out, _ = b.communicate(timeout=300)
    finally:
        if b.poll() is None:
            b.kill()
        b_err.close()
    err = (tmp_path / "b.err").read_text()
    assert b.returncode == 0, err[-3000:]
    res = json.loads(b_out.strip().splitlines()[-1])
    assert res["checkpoint"]["reused"] is True, res
    assert "reusing it" in err and "waited" in err
    rec = _record(out)
    assert rec["status"] == "ok" and rec["defence_checkpoint"]["reused"] is False
    assert rec["defence_checkpoint"]["key"] == res["key"]


def test_stale_partial_checkpoint_is_removed_on_the_next_run_of_its_key(tiny_dir, tmp_path):
    """A real SIGKILL while the checkpoint's weights are written (fault_driver's save_weights point), then
    a planted partial copy of a dead pid: the next run of that key removes both and trains."""
    d = tmp_path / "scenario"
    env = {**os.environ, "PYTHONPATH": str(DRIVER.parent.parent)}
    run = subprocess.run([sys.executable, str(DRIVER), "run", "--dir", str(d), "--model", str(tiny_dir),
                          "--fault", "save_weights:1"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    ck = d / "results" / "checkpoints"
    left = [p for p in ck.iterdir() if ".partial-" in p.name]
    assert len(left) == 1 and any(left[0].rglob("*.safetensors"))
    key = left[0].name.split(".partial-")[0]
    planted = ck / f"{key}.partial-{_dead_pid()}"  # the old name, without a host
    planted.mkdir()
    (planted / "model.safetensors").write_bytes(b"x" * 1024)
    other_key = ck / f"other-key.partial-{_dead_pid()}"  # another key's: not this run's business
    other_key.mkdir()
    res = subprocess.run([sys.executable, str(DRIVER), "resume", "--model", str(tiny_dir), str(d)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "removed stale partial checkpoint" in res.stderr
    assert not [p for p in ck.iterdir() if p.name.startswith(key + ".partial-")]
    assert other_key.exists()
    assert (ck / key / ".complete").exists()
    assert json.loads((d / "resume.json").read_text())["record"]["status"] == "ok"


def test_status_and_watch_fail_in_one_line(tmp_path, capsys):
    from harness.cli import main

    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [[str(tmp_path / "missing")], [str(a_file)], [str(tmp_path), "--watch", "-1"],
             [str(tmp_path), "--watch", "0"], [str(tmp_path), "--watch", "1e12"]]
    for args in cases:
        assert main(["status", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, (args, err)
    # a damaged or foreign sweep state is a warning line, the records are still counted
    state = tmp_path / "_sweep" / "state.json"
    state.parent.mkdir()
    for text in ("{", "[1]", json.dumps({"stages": {"x": 5}}), json.dumps({"stages": []})):
        state.write_text(text)
        assert main(["status", str(tmp_path)]) == 0, text
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err and "warning:" in captured.out, text
    state.unlink()
    state.mkdir()  # a folder where the state file belongs
    assert main(["status", str(tmp_path)]) == 0
    assert "warning: " in capsys.readouterr().out


def test_status_watch_stops_on_ctrl_c_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(DRIVER.parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "status", str(tmp_path), "--watch", "0.2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err and "no sweep state" in out
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "status", str(tmp_path), "--watch", "0.2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "Traceback" not in err and err.strip().startswith("interrupted")


def test_analyze_bad_paths_are_one_line(tmp_path, capsys):
    from harness.cli import main

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "model.safetensors").write_bytes(b"\x00garbage")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for args in ([str(tmp_path / "missing"), str(tmp_path)], [str(a_file), str(a_file)],
                 [str(damaged), str(damaged)], [str(tmp_path), str(tmp_path)],
                 [str(damaged), str(damaged), "--out", str(a_file)]):
        assert main(["analyze", "weight-distance", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, (args, err)
