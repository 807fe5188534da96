"""Result records: one JSON file per trial, written atomically, found again by trial id.

Record schema (version ``SCHEMA_VERSION``)::

    {
      "schema_version": 1,
      "trial_id": "repnoise--harmfulqa--s0--1a2b3c4d5e6f",
      "status": "ok" | "error" | "diverged" | "oom" | "running",
      "error": null | {"type": str, "message": str, "traceback": str, "stage": str, ...},
      "config": {...full canonical RunSpec: preset, model, defence, attack, eval, seed...},
      "seed": 0,
      "model": {"id": str, "source": str, "path": str, "fallback": str | null, "parameters": int},
      "defence_checkpoint": {"key": str, "path": str, "reused": bool} | null,
      "scores": {
        "pre_attack":  {"harmfulness": {"mean": float, "std": float, "frac_harmful": float,
                                         "n": int, "scorer": {...provenance}},
                        "capability": {...}, ...},
        "post_attack": {...same shape...}
      },
      "criteria": {"resistance": ..., "stability": ..., "trainability": ..., "generalization": ...},
      "train": {"defence": {"steps": int, "final_loss": float, "losses": [...]},
                "attack":  {"steps": int, "final_loss": float, "losses": [...]}},
      "samples": {"pre_attack": [{"prompt": str, "generation": str, "score": float}], "post_attack": [...]},
      "timings": {"total_s": float, "<stage>_s": float, ...},
      "environment": {"harness": str, "python": str, "packages": {name: version}, "git_commit": str,
                      "device": str, "hostname": str},
      "started_at": iso8601, "finished_at": iso8601
    }

Writes go to a temporary file in the same folder, are fsynced, then renamed over the target,
so a killed process leaves either the old file or the new one, never half of one. Temporary
files carry a ``.tmp`` suffix and are never read back.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1
RECORD_SUFFIX = ".json"
FINISHED = ("ok", "diverged")  # a rerun skips these; "error"/"oom" are retried


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


class ResultStore:
    """A results folder: ``<root>/<trial_id>.json`` (+ ``<root>/samples/<trial_id>.jsonl``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, trial_id: str) -> Path:
        return self.root / f"{trial_id}{RECORD_SUFFIX}"

    def load(self, trial_id: str) -> dict[str, Any] | None:
        path = self.path(trial_id)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # never trust a damaged record: the trial reruns

    def is_finished(self, trial_id: str) -> bool:
        rec = self.load(trial_id)
        return bool(rec) and rec.get("status") in FINISHED and rec.get("schema_version") == SCHEMA_VERSION

    def write(self, record: dict[str, Any]) -> Path:
        """Write atomically; every string passes ``harness.api.secrets.redact`` on the way (API keys
        never reach a record, whatever an error message carried)."""
        from harness.api.secrets import redact_obj

        path = self.path(record["trial_id"])
        atomic_write_json(path, redact_obj(record))
        return path

    def records(self) -> Iterator[dict[str, Any]]:
        if not self.root.exists():
            return
        for path in sorted(self.root.glob(f"*{RECORD_SUFFIX}")):
            try:
                rec = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict) and "trial_id" in rec and "schema_version" in rec:
                yield rec


def load_records(root: str | os.PathLike) -> list[dict[str, Any]]:
    return list(ResultStore(root).records())
