import json
import logging
import subprocess
import sys

import pytest

from harness.api.record import SCHEMA_VERSION, RecordError, TrialRecord
from harness.api.secrets import register_secret
from harness.lib.store import ResultStore, atomic_write_json, load_records


def _rec(tid: str, status: str = "ok", **extra) -> TrialRecord:
    return TrialRecord(trial_id=tid, status=status, config={"defence": {"name": "none"}}, **extra)


def test_atomic_write_roundtrip_and_no_temp_left(tmp_path):
    store = ResultStore(tmp_path)
    rec = _rec("t1", timings={"total_s": 1.5})
    path = store.write(rec)
    assert path == tmp_path / "t1.json"
    loaded = store.load("t1")
    assert isinstance(loaded, TrialRecord) and loaded == rec
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    assert store.is_finished("t1")
    assert [p.name for p in tmp_path.iterdir()] == ["t1.json"]
    assert store.load("absent") is None and not store.is_finished("absent")


def test_write_takes_a_record_and_redacts(tmp_path):
    store = ResultStore(tmp_path)
    with pytest.raises(TypeError, match="TrialRecord"):
        store.write({"schema_version": SCHEMA_VERSION, "trial_id": "t", "status": "ok", "config": {}})
    secret, in_url = "store-test-secret-0123456789", "url-secret-9876543210"
    register_secret(secret)
    rec = _rec("t5", status="error", error={"type": "HTTPError", "message": f"{secret} rejected: /v1?key={in_url}"},
               notes=[f"key {secret}"])
    text = store.write(rec).read_text()
    assert secret not in text and in_url not in text and text.count("[REDACTED]") == 3
    assert store.load("t5").error.type == "HTTPError"


def test_damaged_or_running_records_are_not_trusted(tmp_path, caplog):
    store = ResultStore(tmp_path)
    (tmp_path / "t2.json").write_text('{"schema_version": 2, "trial_id": "t2", "sta')
    with caplog.at_level(logging.WARNING):
        assert store.load("t2") is None and not store.is_finished("t2")
    assert "t2.json" in caplog.text and "not valid JSON" in caplog.text
    store.write(_rec("t3", status="running"))
    assert not store.is_finished("t3")
    store.write(_rec("t4", status="error"))
    assert not store.is_finished("t4")
    store.write(_rec("t6", status="diverged"))
    assert store.is_finished("t6")  # deterministic: a rerun would diverge again
    errors: list[RecordError] = []
    assert [r.trial_id for r in store.records(errors)] == ["t3", "t4", "t6"]
    assert len(errors) == 1 and "t2.json" in str(errors[0])


def test_unreadable_files_are_reported_not_dropped(tmp_path, caplog):
    """Every kind of bad file ends up in ``errors`` with a one-line reason naming it."""
    store = ResultStore(tmp_path)
    store.write(_rec("good"))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "newer.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, "trial_id": "newer",
                                                     "status": "ok", "config": {}}))
    (tmp_path / "noversion.json").write_text(json.dumps({"trial_id": "noversion", "status": "ok"}))
    (tmp_path / "badfield.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "trial_id": "badfield",
                                                       "status": "finished", "config": {}}))
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "folder.json").mkdir()
    (tmp_path / ".good.json.abc.tmp").write_text("half a reco")
    errors: list[RecordError] = []
    assert [r.trial_id for r in store.records(errors)] == ["good"]
    reasons = {str(e).split(":")[0].rsplit("/", 1)[-1]: str(e) for e in errors}
    assert sorted(reasons) == ["badfield.json", "binary.json", "folder.json", "list.json", "newer.json",
                               "noversion.json"]
    assert all("\n" not in text for text in reasons.values())
    assert "must be a JSON object, got list" in reasons["list.json"]
    assert f"schema version {SCHEMA_VERSION + 1} is newer" in reasons["newer.json"]
    assert "'schema_version'" in reasons["noversion.json"]
    assert "field 'status'" in reasons["badfield.json"]
    assert "is a directory" in reasons["folder.json"]
    with caplog.at_level(logging.WARNING):  # without a list: a warning per file, still not silent
        assert [r.trial_id for r in load_records(tmp_path)] == ["good"]
    assert caplog.text.count("record skipped") == 6
    with pytest.raises(RecordError, match="newer.json: schema version"):
        store.read("newer")
    (tmp_path / "other.json").write_text(store.path("good").read_text())
    with pytest.raises(RecordError, match="holds trial 'good', not 'other'"):
        store.read("other")


def test_old_records_are_migrated_when_read(tmp_path):
    store = ResultStore(tmp_path)
    atomic_write_json(store.path("old"), {"schema_version": 1, "trial_id": "old", "status": "ok", "skipped": True,
                                          "config": {"attack": {"name": "toxicity"}}, "scores": {}})
    rec = store.load("old")
    assert rec.schema_version == SCHEMA_VERSION and rec.evaluation == "toxicity" and not rec.skipped
    assert store.is_finished("old")


def test_killed_writer_leaves_old_file_intact(tmp_path):
    """A process killed in the middle of a large atomic write leaves the previous version."""
    path = tmp_path / "rec.json"
    atomic_write_json(path, {"v": "old"})
    code = (
        "import os, sys\n"
        "from harness.lib import store\n"
        "real = os.fsync\n"
        "def die(fd):\n"
        "    os.kill(os.getpid(), 9)\n"
        "os.fsync = die\n"
        f"store.atomic_write_json({str(path)!r}, {{'v': 'new' * 100000}})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode != 0
    assert json.loads(path.read_text()) == {"v": "old"}


def test_status_names_unreadable_records(tmp_path):
    from harness.sweep.status import collect, format_status

    store = ResultStore(tmp_path)
    store.write(_rec("a"))
    store.write(_rec("b", status="error"))
    (tmp_path / "c.json").write_text("{")
    info = collect(tmp_path)
    assert info["records"] == {"ok": 1, "error": 1} and info["n_records"] == 2
    assert len(info["unreadable"]) == 1 and "c.json: not valid JSON" in info["unreadable"][0]
    text = format_status(info)
    assert "records: 1 error, 1 ok" in text and "1 record file(s) could not be read" in text and "c.json" in text
