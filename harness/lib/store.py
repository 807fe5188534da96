"""Result records: one JSON file per trial, written atomically, read back as ``TrialRecord``.

A results folder holds ``<trial_id>.json`` (one ``harness.api.record.TrialRecord`` each, schema in
``docs/record.schema.json``) and ``samples/<trial_id>.jsonl``. Everything that reads records goes
through ``ResultStore``, which validates each file with ``TrialRecord.read`` (older schema versions
are migrated there; a newer version, a damaged file or a JSON value that is not a record is a
``RecordError`` naming the file):

- ``load(tid)``: the record, or ``None`` when there is none or it cannot be read (a warning names the
  file and why);
- ``records(errors)``: every readable record in trial-id order; each file that cannot be read is
  appended to ``errors`` as a ``RecordError`` (or logged as a warning without a list), never dropped
  silently, so a table can say which files it left out;
- ``is_finished(tid)``: a readable record whose status a rerun skips (``ok``, ``diverged``);
- ``write(record)``: atomic, every string redacted (API keys never reach a record), and never
  losing a result (below).

**Nothing finished is lost.** ``write`` merges the record with the one on disk. A run is one
``owner.run_id`` (``harness.lib.locks.new_owner``); writes of the same run replace each other.
Against a record of another run:

- the file holds a *finished* result (``ok``, ``diverged``) and the new record is not finished
  (``running``, ``error``, ``oom``, ``interrupted``): the finished result stays; the new run goes
  into its ``attempts`` (status, times, error, owner), updated in place by later writes of that run;
- the file holds an unfinished record: the new record replaces it and the old one joins the new
  record's ``attempts`` (history is carried over, so no failed attempt's details are lost);
- a finished record replaces a finished one (a newer finished result), keeping its ``attempts``;
- the file cannot be read (damaged, not an object, an older version that cannot be migrated): it
  is moved to ``_superseded/<name>.<UTC time>.json`` and the new record says so in ``notes``;
  a record of a *newer* schema version, or a folder where the file belongs, is never touched:
  ``write`` raises ``RecordError`` (``check_writable`` says so before a trial starts).

Writes go to a temporary file in the same folder, are fsynced, then renamed over the target,
so a killed process leaves either the old file or the new one, never half of one. Temporary
files start with ``.`` and end with ``.tmp`` and are never read back.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from harness.api.record import FINISHED, SCHEMA_VERSION, Attempt, RecordError, TrialRecord
from harness.api.secrets import redact_obj
from harness.lib.locks import lock_path, owner_state

__all__ = ["FINISHED", "RECORD_SUFFIX", "SCHEMA_VERSION", "SUPERSEDED_DIR", "RecordError", "ResultStore",
           "TrialRecord", "atomic_write_bytes", "atomic_write_json", "load_records", "same_run", "schema_mix"]

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".json"
SUPERSEDED_DIR = "_superseded"
MIGRATED_NOTE = "record: read from schema version {old}, migrated to {new}"


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


def run_id(record: TrialRecord) -> Optional[str]:
    value = (record.owner or {}).get("run_id")
    return str(value) if value else None


def same_run(a: TrialRecord, b: TrialRecord) -> bool:
    """Whether two records were written by the same run (same ``owner.run_id``; records without one
    are the same run when they started at the same time)."""
    ra, rb = run_id(a), run_id(b)
    if ra or rb:
        return ra == rb
    return a.started_at == b.started_at


def attempt_of(record: TrialRecord, status: Optional[str] = None, note: Optional[str] = None) -> Attempt:
    """The ``attempts`` entry of a run that did not replace the stored result."""
    extra: dict[str, Any] = {}
    if record.owner:
        extra["owner"] = dict(record.owner)
    if note:
        extra["note"] = note
    return Attempt(status=status or record.status, started_at=record.started_at, finished_at=record.finished_at,
                   error=_plain(record.error), **extra)


def _plain(value: Any) -> Any:
    """A model or a dict (an assignment skips validation) as plain JSON data, for re-validation."""
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def _attempt_run(attempt: Attempt) -> Optional[str]:
    owner = getattr(attempt, "owner", None)
    return str(owner.get("run_id")) if isinstance(owner, dict) and owner.get("run_id") else None


def _upsert(attempts: list[Attempt], entry: Attempt) -> list[Attempt]:
    """``attempts`` with ``entry`` replacing the entry of the same run (or appended)."""
    rid = _attempt_run(entry)
    out = [a for a in attempts
           if not ((rid and _attempt_run(a) == rid)
                   or (not rid and not _attempt_run(a) and a.started_at == entry.started_at))]
    return out + [entry]


def schema_mix(records: list[TrialRecord]) -> dict[int, int]:
    """``{schema version read from disk: count}`` of ``records`` (migrated ones say their version in
    ``notes``); more than one key means tables mix records of different schema versions."""
    out: dict[int, int] = {}
    for rec in records:
        version = rec.schema_version
        for note in rec.notes:
            if note.startswith("record: read from schema version "):
                try:
                    version = int(note.split("schema version ", 1)[1].split(",")[0])
                except ValueError:
                    pass
        out[version] = out.get(version, 0) + 1
    return out


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
            raise RecordError(f"{path}: holds trial {record.trial_id!r}, not {trial_id!r}", path)
        return record

    def load(self, trial_id: str) -> Optional[TrialRecord]:
        """The record of ``trial_id``, or ``None`` when there is none or it cannot be read. An unreadable
        file is never trusted and never ignored quietly: a warning names it and says why (a rerun
        moves it to ``_superseded/``, it is never overwritten)."""
        if not self.path(trial_id).exists():
            return None
        try:
            return self.read(trial_id)
        except RecordError as exc:
            log.warning("record not usable, the trial will run again (the file is kept): %s", exc)
            return None

    def is_finished(self, trial_id: str) -> bool:
        """Whether a readable record of ``trial_id`` has a status a rerun skips (``ok``, ``diverged``)."""
        record = self.load(trial_id)
        return record is not None and record.finished

    def newer_version(self, trial_id: str) -> Optional[int]:
        """The schema version of the stored file when it is newer than this harness reads."""
        path = self.path(trial_id)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        version = data.get("schema_version") if isinstance(data, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
            return version
        return None

    def check_writable(self, trial_id: str) -> None:
        """Raise ``RecordError`` (one line) when a record of ``trial_id`` cannot be written here
        without losing something: the folder is a file, the record's path is a folder, or the
        stored record is of a newer schema version than this harness writes."""
        if self.root.exists() and not self.root.is_dir():
            raise RecordError(f"results folder {self.root} is a file, not a folder; choose another --output")
        path = self.path(trial_id)
        if path.is_dir():
            raise RecordError(f"{path}: is a directory where the trial's record belongs; move it away", path)
        version = self.newer_version(trial_id) if path.exists() else None
        if version is not None:
            raise RecordError(f"{path}: holds a record of schema version {version}, newer than this harness "
                              f"writes ({SCHEMA_VERSION}); it is not overwritten: upgrade ftdefence-harness or "
                              f"use another --output", path)

    def supersede(self, trial_id: str, reason: str) -> Path:
        """Move the stored (unreadable) file of ``trial_id`` to ``_superseded/``; return where."""
        path = self.path(trial_id)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.root / SUPERSEDED_DIR / f"{path.stem}.{stamp}-{os.getpid()}{RECORD_SUFFIX}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        log.warning("%s could not be read (%s): kept as %s", path, reason, target)
        return target

    def merged(self, record: TrialRecord) -> TrialRecord:
        """What ``write(record)`` puts on disk: ``record`` merged with the stored record (see the
        module docstring). ``record.attempts`` and ``record.notes`` are updated in place."""
        path = self.path(record.trial_id)
        if not path.exists() and not path.is_symlink():
            return record
        self.check_writable(record.trial_id)
        try:
            stored = self.read(record.trial_id)
        except RecordError as exc:
            kept = self.supersede(record.trial_id, exc.reason)
            note = f"record: the previous file could not be read ({exc.reason}); kept as {kept}"
            if note not in record.notes:
                record.notes.append(note)
            return record
        if same_run(stored, record):
            return record
        self._bury_dead_attempts(stored)
        if stored.finished and not record.finished:
            note = ("a finished result was already stored; this run did not replace it"
                    if record.status != "running" else "running while a finished result is stored")
            stored.attempts = _upsert(stored.attempts, attempt_of(record, note=note))
            return stored
        if stored.finished:  # both finished: a newer finished result replaces the stored one
            log.info("trial %s: the finished result of %s is replaced by this run's (%s)", record.trial_id,
                     stored.finished_at or stored.started_at, record.status)
            history = list(stored.attempts)
        else:  # the stored run did not finish: it joins the history
            status, note = stored.status, None
            if status == "running":  # replaced by another run: that run is gone or abandoned
                status, note = "dead", f"ended without writing its result ({self._why_dead(stored.owner)})"
            history = _upsert(list(stored.attempts), attempt_of(stored, status=status, note=note))
        for entry in record.attempts:
            history = _upsert(history, entry)
        record.attempts = history
        return record

    def _why_dead(self, owner: dict[str, Any]) -> str:
        state, reason = owner_state(owner)
        return reason if state == "dead" else "killed, or the machine stopped"

    def _bury_dead_attempts(self, stored: TrialRecord) -> None:
        """``running`` attempts of a stored record whose process is gone become ``dead``."""
        for attempt in stored.attempts:
            owner = getattr(attempt, "owner", None)
            if attempt.status == "running":
                state, reason = owner_state(owner if isinstance(owner, dict) else {},
                                            lock_path(self.root, stored.trial_id))
                if state == "dead":
                    attempt.status = "dead"
                    setattr(attempt, "note", f"ended without writing its result ({reason})")

    def write(self, record: TrialRecord) -> Path:
        """Write ``record`` atomically to ``<root>/<trial_id>.json``, merged with the stored one so
        that no finished result or earlier attempt is lost (module docstring); every string passes
        ``harness.api.secrets.redact`` on the way (API keys never reach a record)."""
        if not isinstance(record, TrialRecord):
            raise TypeError(f"ResultStore.write takes a TrialRecord, not {type(record).__name__}")
        path = self.path(record.trial_id)
        atomic_write_json(path, redact_obj(self.merged(record).to_json()))
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
