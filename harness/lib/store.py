"""Result records: one JSON file per trial, written atomically, read back as ``TrialRecord``.

A results folder holds ``<trial_id>.json`` (one ``harness.api.record.TrialRecord`` each, schema in
``docs/record.schema.json``) and ``samples/<trial_id>.jsonl``. Everything that reads records goes
through ``ResultStore``, which validates each file with ``TrialRecord.read`` (older schema versions
are migrated there; a newer version, a damaged file or a JSON value that is not a record is a
``RecordError`` naming the file):

- ``load(tid)``: the record, or ``None`` when there is none or it cannot be read (a warning names the
  file and why; the trial then reruns and replaces it);
- ``records(errors)``: every readable record in trial-id order; each file that cannot be read is
  appended to ``errors`` as a ``RecordError`` (or logged as a warning without a list), never dropped
  silently, so a table can say which files it left out;
- ``is_finished(tid)``: a readable record whose status a rerun skips (``ok``, ``diverged``);
- ``write(record)``: atomic, every string redacted (API keys never reach a record).

Writes go to a temporary file in the same folder, are fsynced, then renamed over the target,
so a killed process leaves either the old file or the new one, never half of one. Temporary
files start with ``.`` and end with ``.tmp`` and are never read back.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from harness.api.record import FINISHED, SCHEMA_VERSION, RecordError, TrialRecord
from harness.api.secrets import redact_obj

__all__ = ["FINISHED", "RECORD_SUFFIX", "SCHEMA_VERSION", "RecordError", "ResultStore", "TrialRecord",
           "atomic_write_bytes", "atomic_write_json", "load_records"]

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".json"


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

    def read(self, trial_id: str) -> TrialRecord:
        """The record of ``trial_id``; ``RecordError`` (one line naming the file) when it is missing or
        cannot be read as a ``TrialRecord``."""
        path = self.path(trial_id)
        if not path.exists():
            raise RecordError(f"{path}: no such record")
        record = TrialRecord.read(path)
        if record.trial_id != trial_id:
            raise RecordError(f"{path}: holds trial {record.trial_id!r}, not {trial_id!r}")
        return record

    def load(self, trial_id: str) -> Optional[TrialRecord]:
        """The record of ``trial_id``, or ``None`` when there is none or it cannot be read. An unreadable
        file is never trusted (the trial reruns and replaces it) and never ignored quietly: a warning
        names it and says why."""
        if not self.path(trial_id).exists():
            return None
        try:
            return self.read(trial_id)
        except RecordError as exc:
            log.warning("record not usable, the trial will run again: %s", exc)
            return None

    def is_finished(self, trial_id: str) -> bool:
        """Whether a readable record of ``trial_id`` has a status a rerun skips (``ok``, ``diverged``)."""
        record = self.load(trial_id)
        return record is not None and record.finished

    def write(self, record: TrialRecord) -> Path:
        """Write ``record`` atomically to ``<root>/<trial_id>.json``; every string passes
        ``harness.api.secrets.redact`` on the way (API keys never reach a record, whatever an error
        message carried)."""
        if not isinstance(record, TrialRecord):
            raise TypeError(f"ResultStore.write takes a TrialRecord, not {type(record).__name__}")
        path = self.path(record.trial_id)
        atomic_write_json(path, redact_obj(record.to_json()))
        return path

    def files(self) -> list[Path]:
        """The record files of the folder (temporary files excluded), sorted by name."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob(f"*{RECORD_SUFFIX}") if not p.name.startswith("."))

    def records(self, errors: Optional[list[RecordError]] = None) -> Iterator[TrialRecord]:
        """Every readable record, in file-name (trial id) order. A file that cannot be read as a
        ``TrialRecord`` (damaged, not an object, another schema version) is appended to ``errors``,
        or logged as a warning when no list is given."""
        for path in self.files():
            try:
                yield TrialRecord.read(path)
            except RecordError as exc:
                if errors is None:
                    log.warning("record skipped: %s", exc)
                else:
                    errors.append(exc)


def load_records(root: str | os.PathLike, errors: Optional[list[RecordError]] = None) -> list[TrialRecord]:
    """``list(ResultStore(root).records(errors))``."""
    return list(ResultStore(root).records(errors))
