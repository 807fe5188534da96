import json
import os
import subprocess
import sys

from harness.lib.store import ResultStore, atomic_write_json


def test_atomic_write_roundtrip_and_no_temp_left(tmp_path):
    store = ResultStore(tmp_path)
    rec = {"schema_version": 1, "trial_id": "t1", "status": "ok"}
    store.write(rec)
    assert store.load("t1") == rec
    assert store.is_finished("t1")
    assert [p.name for p in tmp_path.iterdir()] == ["t1.json"]


def test_damaged_or_running_records_are_not_trusted(tmp_path):
    store = ResultStore(tmp_path)
    (tmp_path / "t2.json").write_text('{"schema_version": 1, "trial_id": "t2", "sta')
    assert store.load("t2") is None and not store.is_finished("t2")
    store.write({"schema_version": 1, "trial_id": "t3", "status": "running"})
    assert not store.is_finished("t3")
    store.write({"schema_version": 1, "trial_id": "t4", "status": "error"})
    assert not store.is_finished("t4")
    assert {r["trial_id"] for r in store.records()} == {"t3", "t4"}


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
