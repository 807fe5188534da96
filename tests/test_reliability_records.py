"""Records in a shared results folder: nothing finished is lost, nothing unreadable is overwritten.

``ResultStore.write`` merges a record with the stored one (docs/reliability.md): a finished result
is only replaced by a newer finished result; a run that did not finish goes into its ``attempts``;
a replaced unfinished record joins the new record's history; an unreadable file is moved to
``_superseded/``; a newer-schema file or a folder in its place is refused before a trial starts.
(The same through real processes, signals and the CLI: ``test_reliability_signals.py``.)
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

import fault_driver
from harness.api.record import SCHEMA_VERSION, RecordError, TrialRecord
from harness.lib.locks import new_owner
from harness.lib.store import SUPERSEDED_DIR, ResultStore, atomic_write_json, load_records, schema_mix
from harness.sweep.status import record_warnings


def _rec(tid: str, status: str, owner=None, **extra) -> TrialRecord:
    return TrialRecord(trial_id=tid, status=status, config={"defence": {"name": "none"}},
                       owner=owner if owner is not None else new_owner(), started_at=extra.pop("started_at", "t0"),
                       **extra)


def _error(stage: str, message: str) -> dict:
    return {"type": "RuntimeError", "stage": stage, "message": message}


@pytest.mark.parametrize("status", ["running", "error", "oom", "interrupted"])
def test_a_run_that_does_not_finish_never_replaces_a_finished_result(tmp_path, status):
    store = ResultStore(tmp_path)
    ok = _rec("t", "ok", scores={"post_attack": {"harmfulness": {"mean": 0.25}}}, finished_at="t1")
    store.write(ok)
    rerun = _rec("t", "running", started_at="t2")
    store.write(rerun)  # its "running" write
    rerun.status = status
    if status != "running":
        rerun.error = _error("attack", f"{status} in attack")
    store.write(rerun)  # its last write: the same run, so the same attempt entry is updated
    on_disk = store.load("t")
    assert on_disk.status == "ok" and on_disk.scores.post_attack == ok.scores.post_attack
    assert [a.status for a in on_disk.attempts] == [status]
    assert on_disk.attempts[0].owner["run_id"] == rerun.owner["run_id"]
    if status != "running":
        assert on_disk.attempts[0].error.message == f"{status} in attack"


def test_history_is_kept_across_runs_and_a_newer_finished_result_replaces(tmp_path):
    store = ResultStore(tmp_path)
    first = _rec("t", "error", error=_error("defence", "first failure"), started_at="t0")
    store.write(first)
    second = _rec("t", "running", started_at="t1")
    store.write(second)  # replaces the error record, which joins the history
    assert [a.status for a in store.load("t").attempts] == ["error"]
    second.status = "ok"
    store.write(second)
    ok = store.load("t")
    assert ok.status == "ok" and [a.error.message for a in ok.attempts] == ["first failure"]
    third = _rec("t", "error", error=_error("attack", "third failure"), started_at="t2")
    store.write(third)
    assert [a.status for a in store.load("t").attempts] == ["error", "error"]
    newer = _rec("t", "ok", started_at="t3", scores={"post_attack": {"harmfulness": {"mean": 0.5}}})
    store.write(newer)
    final = store.load("t")
    assert final.started_at == "t3" and final.scores.post_attack["harmfulness"]["mean"] == 0.5
    assert [a.error.message for a in final.attempts] == ["first failure", "third failure"]


def test_a_running_record_left_by_a_dead_process_becomes_a_dead_attempt(tmp_path):
    store = ResultStore(tmp_path)
    dead = _rec("t", "running", owner={**new_owner(), "pid": 2 ** 22 + 12345})  # beyond pid_max: no such pid
    store.write(dead)
    store.write(_rec("t", "ok", started_at="t9"))
    attempts = store.load("t").attempts
    assert [a.status for a in attempts] == ["dead"] and "no longer exists" in attempts[0].note


@pytest.mark.parametrize("content", [b'{"schema_version": 2, "trial_id": "t", "sta', b"[1, 2]", b"\xff\xfe\x00",
                                     json.dumps({"trial_id": "t", "status": "ok"}).encode(),
                                     json.dumps({"schema_version": 0, "trial_id": "t", "status": "ok",
                                                 "config": {}}).encode()])
def test_an_unreadable_record_is_moved_aside_not_overwritten(tmp_path, content, caplog):
    store = ResultStore(tmp_path)
    store.path("t").write_bytes(content)
    with caplog.at_level(logging.WARNING):
        store.write(_rec("t", "running"))
    kept = list((tmp_path / SUPERSEDED_DIR).glob("t.*.json"))
    assert len(kept) == 1 and kept[0].read_bytes() == content
    rec = store.load("t")
    assert rec.status == "running" and any(str(kept[0]) in n for n in rec.notes)
    assert "kept as" in caplog.text
    assert [r.trial_id for r in load_records(tmp_path)] == ["t"]  # the superseded file is not a record


def test_newer_schema_or_a_folder_in_place_is_refused_before_a_trial(tmp_path, tiny_dir, monkeypatch):
    from harness.pipeline.trial import run_trial

    fault_driver.register(monkeypatch)
    spec = fault_driver.make_spec(str(tiny_dir))
    store = ResultStore(tmp_path)
    newer = {"schema_version": SCHEMA_VERSION + 1, "trial_id": spec.trial_id, "status": "ok", "config": {}}
    store.path(spec.trial_id).write_text(json.dumps(newer))
    for force in (False, True):
        with pytest.raises(RecordError, match=f"schema version {SCHEMA_VERSION + 1}, newer .* not overwritten"):
            run_trial(spec, tmp_path, force=force, progress=False)
    with pytest.raises(RecordError, match="not overwritten"):
        store.write(_rec(spec.trial_id, "ok"))
    assert json.loads(store.path(spec.trial_id).read_text()) == newer
    store.path(spec.trial_id).unlink()
    store.path(spec.trial_id).mkdir()
    with pytest.raises(RecordError, match="is a directory where the trial's record belongs"):
        run_trial(spec, tmp_path, progress=False)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RecordError, match="is a file, not a folder"):
        run_trial(spec, a_file, progress=False)
    assert not (tmp_path / ".locks").exists()  # refused before any lock or record


def test_old_schema_records_are_said_when_mixed(tmp_path):
    store = ResultStore(tmp_path)
    atomic_write_json(store.path("old"), {"schema_version": 1, "trial_id": "old", "status": "ok",
                                          "config": {"attack": {"name": "harmfulqa"}}, "scores": {}})
    store.write(_rec("new", "ok"))
    old = store.load("old")
    assert old.finished and any("read from schema version 1" in n for n in old.notes)
    records = load_records(tmp_path)
    assert schema_mix(records) == {1: 1, SCHEMA_VERSION: 1}
    lines = record_warnings(records, tmp_path)
    assert len(lines) == 1 and "mix schema versions (1 of version 1, 1 of version 2)" in lines[0]
    assert record_warnings([store.load("new")], tmp_path) == []
    # an old finished record is skipped, not rerun and overwritten; a forced rerun that fails keeps it
    run = _rec("old", "error", error=_error("attack", "boom"))
    store.write(run)
    again = store.load("old")
    assert again.status == "ok" and [a.status for a in again.attempts] == ["error"]


def test_forced_rerun_that_fails_in_process_keeps_result_and_samples(tmp_path, tiny_dir, monkeypatch, caplog):
    """In-process ``run_trial(force=True)`` failing after the samples were rewritten."""
    import harness.pipeline.stages as stages
    from harness.pipeline.trial import run_trial

    fault_driver.register(monkeypatch)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    spec = fault_driver.make_spec(str(tiny_dir))
    ok = run_trial(spec, tmp_path / "r", progress=False)
    assert ok.status == "ok"
    samples = tmp_path / "r" / ok.samples_file
    before = samples.read_bytes()

    def broken_finish(t):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stages, "STAGES", tuple(s if s.name != "finish" else dataclasses.replace(s, run=broken_finish)
                                                for s in stages.STAGES))
    with caplog.at_level(logging.WARNING):
        rec = run_trial(spec, tmp_path / "r", force=True, progress=False)
    assert rec.status == "error" and any("is kept" in n for n in rec.notes)
    assert "is kept" in caplog.text
    on_disk = ResultStore(tmp_path / "r").load(spec.trial_id)
    assert on_disk.status == "ok" and on_disk.scores == ok.scores and on_disk.started_at == ok.started_at
    assert [(a.status, a.error.stage, a.error.errno) for a in on_disk.attempts] == [("error", "finish", "ENOSPC")]
    assert samples.read_bytes() == before
    assert not [p for p in samples.parent.iterdir() if p.name.startswith(".")]
    from harness.lib.locks import lock_held, lock_path

    assert lock_held(lock_path(tmp_path / "r", spec.trial_id)) is False  # the file stays, nobody holds it
