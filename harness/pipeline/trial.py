"""One trial (one defence x attack cell), end to end: ``run_trial``. No Ray in here.

    open (validate, draw data; no model) -> lock -> "running" record -> STAGES, in order -> record

The stages and their order are ``harness.pipeline.stages.STAGES``; this module adds what only a
whole trial does:

* skip a finished trial (unless ``force``);
* hold the trial's lock (``<results>/.locks/<trial_id>.lock``, ``harness.lib.locks``) for the whole
  run: a second run of the same trial waits for the first, then skips it if the first finished it;
  and the defence key's lock (``<checkpoints>/.locks/<key>.lock``) while the defence stage trains:
  a trial on the same defended model waits and then reuses the checkpoint. Both waits are logged
  and noted in the record. Stale partial checkpoint copies of the key are removed there;
* write the record before and after (``owner`` = pid, host, run id, heartbeat; the heartbeat is
  refreshed in the lock file every 30 s and in the record at stage boundaries), never losing a
  finished result (``ResultStore.write``): a forced rerun that fails or is interrupted goes into
  the stored record's ``attempts``, and the samples file of the stored result is kept (restored if
  the rerun overwrote it, also after a SIGKILL, on the next run);
* turn a failure into a record (``diverged`` with the step, ``oom`` with the batch size, ``error``
  with the stage and a redacted traceback) instead of a crash, and SIGINT/SIGTERM into an
  ``interrupted`` record (``harness.lib.interrupts.Interrupted`` is re-raised for the CLI's exit code).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Iterator, Optional

import torch

from harness.api.config import RunSpec, attack_config, defence_config
from harness.api.errors import DivergedError, HarnessError
from harness.api.record import ErrorInfo, TrialRecord
from harness.api.secrets import redact
from harness.lib.checkpoints import clean_stale_partials, is_complete
from harness.lib.interrupts import Interrupted, deferred, raise_on_signals
from harness.lib.locks import HEARTBEAT_S, FileLock, Heartbeat, describe_owner, lock_path, new_owner
from harness.lib.store import ResultStore
from harness.pipeline import stages
from harness.pipeline.state import Trial, TrialPaths, now, open_trial

log = logging.getLogger("harness.pipeline.trial")


def run_trial(spec: RunSpec, output: str | Path = "results", *, checkpoints: str | Path | None = None,
              force: bool = False, progress: bool = True, raise_errors: bool = False,
              cache_pre_attack: bool = False, attacked_from: str | Path | None = None) -> TrialRecord:
    """Run one cell end to end and write its record; return it (the stored one, with
    ``skipped`` set, if the trial had already finished and ``force`` is false).

    ``cache_pre_attack``: also cache the pre-attack scores of the undefended model (``none``) under
    the checkpoints folder, as a defended model's always are (the sweep shares them between cells).
    ``attacked_from``: a complete checkpoint of the attacked model (the sweep's FSDP attack stage
    saved it); the attack is loaded from it instead of trained here.
    ``raise_errors``: re-raise a failure after its record is written (the sweep retries it).
    SIGINT/SIGTERM (in the main thread, where no other handler is installed) write an
    ``interrupted`` record and raise ``harness.lib.interrupts.Interrupted``.
    """
    paths = TrialPaths.of(output, checkpoints)
    store = ResultStore(paths.output)
    tid = spec.trial_id
    store.check_writable(tid)
    if not force and not _kept_samples(store, tid):  # kept samples of a killed rerun: settle them first
        stored = _finished(store, tid)
        if stored is not None:
            return stored
    if attacked_from is not None and not is_complete(Path(attacked_from)):
        raise ValueError(f"attacked_from={str(attacked_from)!r} is not a complete checkpoint")
    # bad input fails here, before any model is loaded and before any record is written
    t = open_trial(spec, paths, progress=progress, cache_pre_attack=cache_pre_attack, attacked_from=attacked_from)
    owner = new_owner()
    with raise_on_signals():
        lock = _acquire(lock_path(paths.output, tid), owner, f"trial {tid}",
                        lambda o: log.warning("trial %s is being run by %s: waiting for it to end", tid,
                                              describe_owner(o)))
        beat = Heartbeat(lock).start()
        try:
            if lock.waited_for is not None:
                t.record.notes.append(f"run: waited {lock.waited_s:.0f}s for {describe_owner(lock.waited_for)}, "
                                      "which was running this trial")
                if not force:
                    stored = _finished(store, tid, "meanwhile, by the run it waited for")
                    if stored is not None:
                        return stored
            settle_kept_samples(store, tid)
            if not force:
                stored = _finished(store, tid)
                if stored is not None:
                    return stored
            stored = store.load(tid)
            kept = keep_samples(store, stored) if stored is not None and stored.finished else None
            try:
                return _run(t, store, owner, raise_errors, stored)
            finally:
                if kept is not None:
                    with deferred():
                        settle_kept_samples(store, tid)
        finally:
            beat.stop()
            lock.release()


def _finished(store: ResultStore, tid: str, when: str = "") -> Optional[TrialRecord]:
    stored = store.load(tid)
    if stored is not None and stored.finished:
        log.info("trial %s already finished%s (%s): skipping (use --force to rerun)", tid,
                 f" {when}" if when else "", store.path(tid))
        stored.skipped = True
        return stored
    return None


def _acquire(path: Path, owner: dict, what: str, on_wait) -> FileLock:
    lock = FileLock(path, owner, what=what)
    try:
        lock.acquire(on_wait=on_wait)
    except OSError as exc:
        raise HarnessError(f"cannot take the lock {path} ({what}): {exc.strerror or exc}") from None
    return lock


def _run(t: Trial, store: ResultStore, owner: dict, raise_errors: bool, stored: Optional[TrialRecord]) -> TrialRecord:
    spec, record, tid = t.spec, t.record, t.spec.trial_id
    record.owner = owner  # the lock's dict: the heartbeat thread refreshes it
    if not _write_record(store, record, "setup", raise_errors):
        return record
    t_start = time.perf_counter()
    last_write = time.monotonic()
    try:
        for stage in stages.STAGES:
            with _defence_lock(t, owner) if stage.name == "defence" else contextlib.nullcontext():
                stages.run_stage(t, stage)
            if time.monotonic() - last_write > HEARTBEAT_S:  # a long stage ended: show progress and life
                owner["heartbeat"] = round(time.time(), 3)
                _write_record(store, record, stage.name, raise_errors)
                last_write = time.monotonic()
    except DivergedError as exc:
        record.status = "diverged"
        record.error = ErrorInfo(type="DivergedError", stage=exc.stage, step=exc.step, loss=str(exc.loss),
                                 message=str(exc))
        log.error("trial %s diverged: %s", tid, exc)
    except torch.cuda.OutOfMemoryError as exc:  # also raised as RuntimeError on some builds
        record.status = "oom"
        record.error = oom_error(t.stage, spec, exc)
        log.error("trial %s ran out of memory in %s", tid, t.stage)
    except KeyboardInterrupt as exc:  # SIGINT / SIGTERM (Interrupted), or a scheduler's cancel
        with deferred():
            name = exc.name if isinstance(exc, Interrupted) else "SIGINT"
            record.status = "interrupted"
            record.error = ErrorInfo(type="Interrupted", stage=t.stage, message=f"interrupted by {name} in {t.stage}")
            record.timings["total_s"] = round(time.perf_counter() - t_start, 2)
            record.finished_at = now()
            _write_record(store, record, t.stage, False)
            _say_kept(store, record, stored)
            log.error("trial %s interrupted by %s in %s; record %s", tid, name, t.stage, store.path(tid))
        raise
    except Exception as exc:  # recorded, then re-raised for the CLI / scheduler to report
        if "out of memory" in str(exc).lower():
            record.status = "oom"
            record.error = oom_error(t.stage, spec, exc)
        else:
            record.status = "error"
            record.error = ErrorInfo(type=type(exc).__name__, stage=t.stage, message=redact(str(exc)),
                                     traceback=redact(traceback.format_exc()))
            if isinstance(exc, OSError) and exc.errno is not None:
                record.error.errno = errno.errorcode.get(exc.errno, exc.errno)
        log.error("trial %s failed in %s: %s: %s", tid, t.stage, type(exc).__name__, redact(str(exc)))
        if raise_errors:
            record.timings["total_s"] = round(time.perf_counter() - t_start, 2)
            record.finished_at = now()
            _write_record(store, record, t.stage, False)
            _say_kept(store, record, stored)
            raise
    record.timings["total_s"] = round(time.perf_counter() - t_start, 2)
    record.finished_at = now()
    with deferred():  # a signal now is delivered once the result is on disk
        _write_record(store, record, "record", raise_errors)
    _say_kept(store, record, stored)
    log.info("trial %s: %s in %.1fs -> %s", tid, record.status, record.timings["total_s"], store.path(tid))
    return record


def _say_kept(store: ResultStore, record: TrialRecord, stored: Optional[TrialRecord]) -> None:
    """A run that did not finish while a finished result was stored: say that the result is kept."""
    if stored is not None and stored.finished and not record.finished:
        note = (f"run: the finished result ({stored.status}, {stored.finished_at or stored.started_at}) is kept in "
                f"{store.path(record.trial_id)}; this {record.status} attempt is listed in its 'attempts'")
        if note not in record.notes:
            record.notes.append(note)
        log.warning("trial %s: %s", record.trial_id, note)


@contextlib.contextmanager
def _defence_lock(t: Trial, owner: dict) -> Iterator[None]:
    """Hold the defence key's lock while the defence stage runs (not needed once its checkpoint is
    complete); remove stale partial copies of the checkpoint first."""
    spec = t.spec
    if spec.defence.name == "none":
        yield
        return
    key = spec.defence_key()
    folder = t.paths.checkpoints / key
    if is_complete(folder):
        clean_stale_partials(folder)
        yield
        return
    lock = _acquire(lock_path(t.paths.checkpoints, key), {**owner, "trial_id": spec.trial_id}, f"defence {key}",
                    lambda o: log.warning("defence checkpoint %s is being trained by %s (trial %s): waiting for it, "
                                          "then reusing it", key, describe_owner(o), o.get("trial_id", "?")))
    try:
        if lock.waited_for is not None:
            t.record.notes.append(f"defence: waited {lock.waited_s:.0f}s for {describe_owner(lock.waited_for)} "
                                  f"training the same checkpoint ({key})"
                                  + ("; reused it" if is_complete(folder) else "; it did not finish, trained here"))
        clean_stale_partials(folder, locked=True)
        yield
    finally:
        lock.release()


# ---- the samples file of a stored result, while a forced rerun may overwrite it --------------------
def _samples_path(store: ResultStore, tid: str) -> Path:
    return store.root / "samples" / f"{tid}.jsonl"


def _result_token(record: TrialRecord) -> str:
    ident = f"{record.started_at}|{record.finished_at}|{(record.owner or {}).get('run_id')}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def keep_samples(store: ResultStore, stored: TrialRecord) -> Optional[Path]:
    """Keep a link to the samples file of the stored finished result (``samples/.<tid>.jsonl.kept-<token>``)
    before a rerun may overwrite it; ``settle_kept_samples`` puts it back or drops it."""
    src = _samples_path(store, stored.trial_id)
    if not src.is_file():
        return None
    dst = src.with_name(f".{src.name}.kept-{_result_token(stored)}")
    if dst.exists():
        return dst
    tmp = dst.with_name(dst.name + f".{os.getpid()}.tmp")
    shutil.copy2(src, tmp)  # a copy, not a link: a writer that rewrites the file in place cannot touch it
    os.replace(tmp, dst)
    return dst


def _kept_samples(store: ResultStore, tid: str) -> list[Path]:
    folder = _samples_path(store, tid).parent
    return sorted(folder.glob(f".{tid}.jsonl.kept-*[!p]")) if folder.is_dir() else []


def settle_kept_samples(store: ResultStore, tid: str) -> None:
    """For each kept samples file of ``tid``: restore it when the stored record is still the result
    it belongs to (the rerun did not replace it), else delete it (a newer result replaced it)."""
    kept = _kept_samples(store, tid)
    if not kept:
        return
    record = store.load(tid)
    token = _result_token(record) if record is not None and record.finished else None
    for path in kept:
        if token is not None and path.name.endswith(f".kept-{token}"):
            os.replace(path, _samples_path(store, tid))
            log.info("trial %s: samples of the kept result restored (%s)", tid, _samples_path(store, tid))
        else:
            path.unlink(missing_ok=True)


def _write_record(store: ResultStore, record: TrialRecord, stage: str, raise_errors: bool) -> bool:
    """Write ``record``; a failed write (disk full, permissions) fails this trial, not the caller:
    the record is marked ``error`` and a compact error record is tried in place of the full one.
    Returns whether the full record was written."""
    try:
        store.write(record)
        return True
    except OSError as exc:
        log.error("trial %s: cannot write its record to %s: %s", record.trial_id, store.path(record.trial_id), exc)
        first_error = record.error
        record.status = "error"
        record.error = ErrorInfo(type=type(exc).__name__, stage=stage, message=redact(str(exc)),
                                 errno=errno.errorcode.get(exc.errno, exc.errno) if exc.errno else None,
                                 during="writing the result record",
                                 previous_error=first_error.model_dump(mode="json") if first_error else None)
        record.finished_at = record.finished_at or now()
        compact = TrialRecord(trial_id=record.trial_id, status=record.status, error=record.error,
                              config=record.config, seed=record.seed, evaluation=record.evaluation,
                              started_at=record.started_at, finished_at=record.finished_at)
        try:
            store.write(compact)
        except OSError:
            pass  # nothing more can be done on this disk; the caller gets the record in memory
        if raise_errors:
            raise
        return False


def oom_error(stage: str, spec: RunSpec, exc: BaseException) -> ErrorInfo:
    """The error of an out-of-memory failure, with the batch size the failing stage used."""
    if stage in ("pre_attack", "post_attack", "base_extras"):
        batch_size = spec.eval.batch_size
    elif stage == "data":
        batch_size = spec.synth.batch_size
    else:
        cfg = attack_config(spec) if stage == "attack" else defence_config(spec)
        batch_size = getattr(cfg, "batch_size", None)
    return ErrorInfo(type="OutOfMemory", stage=stage, batch_size=batch_size, eval_batch_size=spec.eval.batch_size,
                     message=redact(str(exc).splitlines()[0][:300] if str(exc) else ""))

