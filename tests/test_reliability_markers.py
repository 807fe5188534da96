"""Damaged checkpoint markers, hostile suite files, and the sweep's defence task under the defence
key's lock (docs/reliability.md).

- A ``.complete`` marker that is truncated, a folder, oversized, binary or of the wrong types is read
  through ``harness.api.safeio``: the checkpoint counts as incomplete, the marker is moved aside
  with one WARNING, ``read_marker`` says why in one line, and the next save writes a sound one.
- A suite file is read with the same checked reader: a billion-laughs suite is refused in one line
  in well under a second.
- The sweep's ``defence`` task takes the lock ``harness run`` takes (``<storage>/.locks/<key>.lock``):
  while another process holds it, the task waits, then reuses the checkpoint instead of training.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.api.errors import ConfigError
from harness.lib import checkpoints as ck
from harness.lib.locks import FileLock, lock_path, new_owner
from harness.lib.store import atomic_write_json

SOUND = {"saved_at": "2026-12-01T09:11:16", "defence": {"name": "x"}, "seed": 0,
         "train": {"steps": 3, "first_loss": 2.5, "final_loss": 1.0, "losses": [2.5, 1.5, 1.0]}}


def damage(kind: str, marker: Path, monkeypatch) -> str:
    """Damage ``marker`` the ``kind`` way; returns a word its WARNING / error must hold."""
    if kind == "truncated":
        marker.write_text(json.dumps(SOUND)[:25])
        return "invalid JSON"
    if kind == "empty":
        marker.write_text("")
        return "invalid JSON"
    if kind == "folder":
        marker.mkdir()
        (marker / "x").write_text("{}")
        return "is a folder"
    if kind == "huge":
        monkeypatch.setenv("HARNESS_MAX_CONFIG_MB", "1")
        with open(marker, "wb") as fh:  # sparse: 64 MB on paper, nothing written
            fh.truncate(64 << 20)
        return "over the limit of 1.0 MB"
    if kind == "binary":
        marker.write_bytes(b"{\x00\x01\x02")
        return "binary"
    if kind == "not an object":
        marker.write_text("[1, 2]")
        return "not an object"
    if kind == "saved_at int":
        marker.write_text(json.dumps({**SOUND, "saved_at": 5}))
        return "field 'saved_at' is int, must be str"
    if kind == "seed string":
        marker.write_text(json.dumps({**SOUND, "seed": "0"}))
        return "field 'seed' is str, must be int"
    if kind == "train string":
        marker.write_text(json.dumps({**SOUND, "train": "lots"}))
        return "field 'train' is str"
    if kind == "train steps":
        marker.write_text(json.dumps({**SOUND, "train": {"steps": "many"}}))
        return "field 'train.steps'"
    raise AssertionError(kind)


KINDS = ["truncated", "empty", "folder", "huge", "binary", "not an object", "saved_at int", "seed string",
         "train string", "train steps"]


def test_sound_marker_reads(tmp_path):
    folder = tmp_path / "key"
    folder.mkdir()
    assert not ck.is_complete(folder)
    with pytest.raises(ck.CheckpointError, match="no .complete marker"):
        ck.read_marker(folder)
    atomic_write_json(folder / ck.MARKER, SOUND)
    assert ck.is_complete(folder) and ck.read_marker(folder) == SOUND


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_marker_is_incomplete_and_moved_aside(kind, tmp_path, monkeypatch, caplog):
    folder = tmp_path / "key"
    folder.mkdir()
    marker = folder / ck.MARKER
    word = damage(kind, marker, monkeypatch)
    with pytest.raises(ck.CheckpointError) as info:  # read where a marker is required: one line, why
        ck.read_marker(folder)
    msg = str(info.value)
    assert "\n" not in msg and word in msg and "is damaged" in msg, msg
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        assert ck.is_complete(folder) is False
    assert time.perf_counter() - t0 < 1.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and word in warnings[0] and str(marker) in warnings[0], warnings
    assert not os.path.lexists(marker)  # moved aside: the next run does not trip on it again
    aside = [p for p in folder.iterdir() if p.name.startswith(ck.MARKER + ".damaged-")]
    assert len(aside) == 1 and aside[0].name in warnings[0]


class FakeModel:
    def save_pretrained(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"weights")


def test_save_after_a_damaged_marker_writes_a_sound_one(tmp_path, monkeypatch):
    folder = tmp_path / "key"
    folder.mkdir()
    damage("folder", folder / ck.MARKER, monkeypatch)
    assert not ck.is_complete(folder)
    ck.save_model(FakeModel(), None, folder, meta={"seed": 1})
    assert ck.is_complete(folder) and ck.read_marker(folder)["seed"] == 1
    assert (folder / "model.safetensors").read_bytes() == b"weights"


# ---- suite files ---------------------------------------------------------------------------------
def billion_laughs() -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\ndescription: *a9\ntrials: [{defence: none, attack: harmfulqa}]\n"


def test_billion_laughs_suite_is_refused_in_one_line(tmp_path, capsys):
    from leaderboards.suite import load_suite

    path = tmp_path / "laughs.yaml"
    path.write_text(billion_laughs())
    assert path.stat().st_size < 1000
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_suite(str(path))
    assert time.perf_counter() - t0 < 1.0
    msg = str(info.value)
    assert "\n" not in msg and "billion laughs" in msg and str(path) in msg, msg
    # the CLI: exit 2, one line, before any trial or model (timed after the imports: cmd_nightly
    # imports harness.sweep.nightly, and with it torch, before it reads the suite)
    import harness.sweep.nightly  # noqa: F401
    from harness.cli import main

    t0 = time.perf_counter()
    assert main(["nightly", "--suite", str(path), "--output", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - t0 < 1.0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "billion laughs" in err[0], err


@pytest.mark.parametrize("kind,needle", [("folder", "is a folder"), ("binary", "binary"),
                                         ("big", "over the limit"), ("deep", "nested more than")])
def test_hostile_suite_files(kind, needle, tmp_path, monkeypatch):
    from leaderboards.suite import load_suite

    path = tmp_path / "s.yaml"
    if kind == "folder":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"trials: \x00\x01")
    elif kind == "big":
        monkeypatch.setenv("HARNESS_MAX_CONFIG_MB", "1")
        path.write_text("description: " + "x" * (2 << 20) + "\n")
    else:
        path.write_text("trials: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_suite(str(path))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_shipped_suites_still_load():
    from leaderboards.suite import load_suite, suite_names

    for name in suite_names():
        assert load_suite(name).trials


# ---- the sweep's defence task takes the defence key's lock ---------------------------------------
def test_sweep_defence_task_waits_for_the_defence_lock_then_reuses(tmp_path, monkeypatch, caplog):
    """Unit level (the two-process test is tests/test_reliability_signals.py): a holder of the lock
    ``harness run`` takes completes the checkpoint while the task waits; the task then runs the
    defence stage, which finds the checkpoint complete (nothing trained)."""
    from harness.sweep import worker

    storage = tmp_path / "ck"
    key = "test_defence--abc123"
    spec = SimpleNamespace(defence=SimpleNamespace(name="test_defence"), defence_key=lambda: key, trial_id="t1")
    seen: list[tuple[str, bool]] = []

    def fake_stage(t, stage):  # the real stage decides train/reuse by is_complete, under the lock
        seen.append((stage.name, ck.is_complete(storage / key)))
        if stage.name == "defence":
            t.record.defence_checkpoint = SimpleNamespace(model_dump=lambda mode: {"reused": ck.is_complete(
                storage / key)})

    monkeypatch.setattr(worker, "_open", lambda *a, **k: SimpleNamespace(record=SimpleNamespace()))
    monkeypatch.setattr(worker, "run_stage", fake_stage)
    holder = FileLock(lock_path(storage, key), {**new_owner(), "trial_id": "other"}, what=f"defence {key}")
    holder.acquire()

    def finish():
        time.sleep(0.5)
        (storage / key).mkdir(parents=True)
        atomic_write_json(storage / key / ck.MARKER, SOUND)
        holder.release()

    th = threading.Thread(target=finish)
    th.start()
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        out = worker.stage_defence(spec, tmp_path / "out", storage, {"kind": "defence", "id": "defence:abc"})
    th.join()
    assert time.perf_counter() - t0 >= 0.45  # it waited for the holder
    assert ("defence", True) in seen and out["checkpoint"]["reused"] is True
    text = caplog.text
    assert f"defence checkpoint {key} is being trained by pid {os.getpid()}" in text and "reusing it" in text
    # and with the lock free and no checkpoint, it takes the lock itself while the stage runs
    seen.clear()
    key2 = "test_defence--def456"
    spec2 = SimpleNamespace(defence=SimpleNamespace(name="test_defence"), defence_key=lambda: key2, trial_id="t2")
    held = []

    def probe(t, stage):  # is the key's lock free while this stage runs?
        lock = FileLock(lock_path(storage, key2))
        free = lock.acquire(wait=False)
        lock.release()
        held.append((stage.name, free))
        t.record.defence_checkpoint = SimpleNamespace(model_dump=lambda mode: {})

    monkeypatch.setattr(worker, "run_stage", probe)
    worker.stage_defence(spec2, tmp_path / "out", storage, {"kind": "defence", "id": "defence:def"})
    assert ("defence", False) in held  # locked by the task while the defence stage ran
    assert all(free for name, free in held if name != "defence")
