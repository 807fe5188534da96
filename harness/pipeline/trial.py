"""One trial (one defence x attack cell), end to end: ``run_trial``. No Ray in here.

    open (validate, draw data; no model) -> "running" record -> STAGES, in order -> record

The stages and their order are ``harness.pipeline.stages.STAGES``; this module adds what only a
whole trial does: skip a finished trial (unless ``force``), write the record before and after,
and turn a failure into a record (``diverged`` with the step, ``oom`` with the batch size,
``error`` with the stage and a redacted traceback) instead of a crash.
"""

from __future__ import annotations

import errno
import logging
import time
import traceback
from pathlib import Path
import torch

from harness.api.config import RunSpec, attack_config, defence_config
from harness.api.errors import DivergedError
from harness.api.record import ErrorInfo, TrialRecord
from harness.api.secrets import redact
from harness.lib.checkpoints import is_complete
from harness.lib.store import ResultStore
from harness.pipeline import stages
from harness.pipeline.state import TrialPaths, now, open_trial

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
    """
    paths = TrialPaths.of(output, checkpoints)
    store = ResultStore(paths.output)
    tid = spec.trial_id
    if not force:
        stored = store.load(tid)
        if stored is not None and stored.finished:
            log.info("trial %s already finished (%s): skipping (use --force to rerun)", tid, store.path(tid))
            stored.skipped = True
            return stored
    if attacked_from is not None and not is_complete(Path(attacked_from)):
        raise ValueError(f"attacked_from={str(attacked_from)!r} is not a complete checkpoint")
    # bad input fails here, before any model is loaded and before any record is written
    t = open_trial(spec, paths, progress=progress, cache_pre_attack=cache_pre_attack, attacked_from=attacked_from)
    record = t.record
    if not _write_record(store, record, "setup", raise_errors):
        return record
    t_start = time.perf_counter()
    try:
        for stage in stages.STAGES:
            stages.run_stage(t, stage)
    except DivergedError as exc:
        record.status = "diverged"
        record.error = ErrorInfo(type="DivergedError", stage=exc.stage, step=exc.step, loss=str(exc.loss),
                                 message=str(exc))
        log.error("trial %s diverged: %s", tid, exc)
    except torch.cuda.OutOfMemoryError as exc:  # also raised as RuntimeError on some builds
        record.status = "oom"
        record.error = oom_error(t.stage, spec, exc)
        log.error("trial %s ran out of memory in %s", tid, t.stage)
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
            raise
    record.timings["total_s"] = round(time.perf_counter() - t_start, 2)
    record.finished_at = now()
    _write_record(store, record, "record", raise_errors)
    log.info("trial %s: %s in %.1fs -> %s", tid, record.status, record.timings["total_s"], store.path(tid))
    return record


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

