"""A ``running`` record whose owner process is gone is shown as ``stale`` (owner gone since its last
heartbeat) in every leaderboard format and counted apart from live ``running`` records, as
``harness status`` counts it as ``dead`` (docs/reliability.md, "Dead runs")."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from harness.lib.locks import FileLock, lock_path
from leaderboards import render as R
from leaderboards import tables as T
from leaderboards.cells import STALE, record_status
from leaderboards.views import load_samples
from test_leaderboard import as_record, build_records, make_record, write_results

HEARTBEAT = 1764597720.0  # 2025-12-01 14:02:00 UTC
GONE = "1 stale: owner gone since 2025-12-01 14:02 UTC"
TOX_COL = "toxicity lr=3e-05 samples=300"


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped) on this host."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def running(seed: int, owner: dict) -> dict:
    rec = make_record("security_vectors", "toxicity", 3e-5, seed, status="running")
    rec["owner"] = owner
    return rec


def owner_of(pid: int, host: str | None = None, heartbeat: float = HEARTBEAT) -> dict:
    return {"pid": pid, "host": host or socket.gethostname(), "run_id": f"run{pid}", "started": heartbeat - 60,
            "heartbeat": heartbeat}


def test_record_status_decides_like_harness_status(tmp_path):
    dead = as_record(running(0, owner_of(dead_pid())))
    alive = as_record(running(1, owner_of(os.getpid(), heartbeat=time.time())))
    other_host_old = as_record(running(2, owner_of(12345, host="elsewhere.invalid")))
    other_host_new = as_record(running(3, owner_of(12345, host="elsewhere.invalid", heartbeat=time.time())))
    no_owner = as_record(make_record("security_vectors", "toxicity", 3e-5, 4, status="running"))
    assert record_status(dead) == STALE
    assert record_status(alive) == "running"
    assert record_status(other_host_old) == STALE  # heartbeat older than locks.STALE_S
    assert record_status(other_host_new) == "running"
    assert record_status(no_owner) == "running"  # nothing to judge by: shown as the record says
    # with the results folder, the trial lock decides too: an existing pid that does not hold the
    # lock is not the record's run (its pid was reused)
    lock = FileLock(lock_path(tmp_path, alive.trial_id), owner=dict(alive.owner))
    lock.acquire()
    lock.release()
    assert record_status(alive, tmp_path) == STALE
    lock.acquire()
    try:
        assert record_status(alive, tmp_path) == "running"
    finally:
        lock.release()


def test_stale_running_record_in_every_format(tmp_path):
    recs = [r for r in build_records() if not (r["config"]["defence"]["name"] == "security_vectors"
                                                 and r["config"]["attack"]["name"] == "toxicity")]
    recs += [running(0, owner_of(dead_pid())), running(1, owner_of(os.getpid(), heartbeat=time.time()))]
    root = write_results(tmp_path / "results", recs)
    from harness.lib.store import load_records

    records = load_records(root)
    samples = load_samples(records, root)
    tox = next(t for t in T.build_tables(records, samples, root) if t.kind == "toxicity")
    text = tox.frame.loc["security_vectors", TOX_COL]
    assert text == f"no result (1 running, {GONE})", text
    cells = tox.cells[(tox.cells.defence == "security_vectors") & (tox.cells.column == TOX_COL)]
    assert cells.failed.tolist() == [f"1 running, {GONE}"]

    out = tmp_path / "board"
    R.write_leaderboard(records, out, ("md", "csv", "html", "tex"), title="stale", samples=samples, results_dir=root)
    for name in ("README.md", "toxicity.csv", "cells.csv", "index.html", "tables.tex"):
        body = (out / name).read_text(encoding="utf-8")
        assert "owner gone since 2025-12-01 14:02 UTC" in body, name
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "1 running, 1 stale (owner gone)" in readme
    assert "1 stale (owner gone)" in (out / "index.html").read_text(encoding="utf-8")


def test_stale_without_results_folder_and_when_every_seed_is_stale(tmp_path):
    """Without the folder the record's owner alone decides; two stale seeds show the later heartbeat."""
    recs = [r for r in build_records() if not (r["config"]["defence"]["name"] == "security_vectors"
                                                 and r["config"]["attack"]["name"] == "toxicity")]
    recs += [running(0, owner_of(dead_pid())), running(1, owner_of(dead_pid(), heartbeat=HEARTBEAT - 3600))]
    records = [as_record(r) for r in recs]
    tox = next(t for t in T.build_tables(records) if t.kind == "toxicity")
    assert tox.frame.loc["security_vectors", TOX_COL] == \
        "no result (2 stale: owner gone since 2025-12-01 14:02 UTC)"
    assert "2 stale (owner gone)" in R.status_summary(records)
