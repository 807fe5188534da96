"""Saving and finding model checkpoints (safetensors), with a completion marker.

A checkpoint folder is trusted only when it holds ``.complete`` (written last, atomically) —
a process killed while saving leaves a folder that is ignored and overwritten. Saving goes to
``<folder>.partial-<pid>@<host>`` first and is renamed into place.

A process killed while saving (SIGKILL, the machine stopping) leaves its partial copy behind: a
full copy of the weights (13 GB for a 7B model). ``clean_stale_partials(folder)`` removes the
partial copies of ``folder`` whose owner is gone: on this host, a pid that no longer exists;
on another host (a shared checkpoint folder), only when the caller holds the key's lock
(``locked``) and the copy has not been written to for ``STALE_PARTIAL_S``. ``save_model`` calls it
before it saves, and the trial's defence stage calls it on every run of that key.

The marker is read through the checked reader (``harness.api.safeio``: at most
``max_config_bytes()``, a regular UTF-8 file, valid JSON) and checked for its types: a JSON object
whose ``saved_at``/``adapter`` are strings, ``seed`` an integer, ``defence`` an object and ``train``
``TrainStats``. A damaged marker (truncated, a folder in its place, oversized, binary, wrong types)
is treated like a cache the harness wrote (docs/reliability.md, "Killed while saving a
checkpoint"): ``is_complete`` moves it aside with a WARNING and answers ``False``, so the checkpoint
is trained (or saved) again instead of every run failing on it; ``read_marker`` on such a folder
raises ``CheckpointError`` in one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from harness.api.errors import ConfigError, HarnessError
from harness.api.record import TrainStats
from harness.api.safeio import load_json, quarantine
from harness.lib.locks import FileLock, Heartbeat, hostname, lock_path, pid_alive
from harness.lib.store import atomic_write_json

log = logging.getLogger("harness.checkpoints")

MARKER = ".complete"
STALE_PARTIAL_S = 3600.0
_PARTIAL = re.compile(r"^(?P<name>.+)\.partial-(?P<pid>\d+)(?:@(?P<host>.+))?$")


class CheckpointError(HarnessError):
    """A checkpoint folder has no usable completion marker."""


_MARKER_TYPES = {"saved_at": str, "adapter": str, "defence": dict}


def check_marker(value: Any) -> dict[str, Any]:
    """``value`` if it is a completion marker (see the module docstring), else ``ValueError`` naming
    the field, its type and what it must be."""
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    for name, kind in _MARKER_TYPES.items():
        if name in value and not isinstance(value[name], kind):
            raise ValueError(f"field {name!r} is {type(value[name]).__name__}, must be {kind.__name__}")
    seed = value.get("seed")
    if "seed" in value and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"field 'seed' is {type(seed).__name__}, must be int")
    train = value.get("train")
    if train is not None:
        if not isinstance(train, dict):
            raise ValueError(f"field 'train' is {type(train).__name__}, must be an object or null")
        try:
            TrainStats.model_validate(train)
        except Exception as exc:  # pydantic.ValidationError: its first error, in one line
            errors = getattr(exc, "errors", lambda: [])()
            first = errors[0] if errors else {}
            where = ".".join(str(x) for x in first.get("loc", ())) or "?"
            raise ValueError(f"field 'train.{where}': {first.get('msg', exc)}") from None
    return value


def _read_marker(folder: Path) -> tuple[Optional[dict[str, Any]], str]:
    """``(marker, "")``, ``(None, "")`` when there is none, or ``(None, why)`` when it is damaged."""
    path = Path(folder) / MARKER
    if not os.path.lexists(path):
        return None, ""
    try:
        return check_marker(load_json(path, "checkpoint marker")), ""
    except (ConfigError, ValueError) as exc:
        return None, str(exc).replace(f"checkpoint marker {str(path)!r}", "").strip(" :") or type(exc).__name__


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a complete checkpoint: its marker exists and is sound. A damaged
    marker is moved aside (one WARNING naming both paths) and the folder counts as incomplete, so
    the checkpoint is made again."""
    marker, why = _read_marker(folder)
    if why:
        quarantine(Path(folder) / MARKER, why, "checkpoint marker")
    return marker is not None


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", hostname())[:64] or "host"


def partial_folder(folder: Path, pid: Optional[int] = None) -> Path:
    """Where this process writes ``folder`` before renaming it into place."""
    folder = Path(folder)
    return folder.with_name(f"{folder.name}.partial-{pid or os.getpid()}@{_host_tag()}")


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    for p in path.rglob("*"):
        try:
            newest = max(newest, p.lstat().st_mtime)
        except OSError:
            pass
    return newest


def stale_partials(folder: Path, *, locked: bool = False, now: Optional[float] = None) -> list[tuple[Path, str]]:
    """``[(partial copy, why it is stale)]`` of ``folder`` (see the module docstring)."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return []
    now = time.time() if now is None else now
    out = []
    for path in sorted(folder.parent.glob(f"{folder.name}.partial-*")):
        m = _PARTIAL.match(path.name)
        if not m or m.group("name") != folder.name:
            continue
        pid, host = int(m.group("pid")), m.group("host")
        if host is None or host == _host_tag():
            if pid == os.getpid():
                continue
            if not pid_alive(pid):
                out.append((path, f"pid {pid} that wrote it no longer exists"))
        elif locked:
            try:
                age = now - _newest_mtime(path)
            except OSError:
                continue
            if age > STALE_PARTIAL_S:
                out.append((path, f"written by pid {pid} on {host}, untouched for {age / 3600:.1f} h"))
    return out


def clean_stale_partials(folder: Path, *, locked: bool = False) -> list[Path]:
    """Remove the stale partial copies of ``folder``; return them (each removal is logged)."""
    removed = []
    for path, why in stale_partials(folder, locked=locked):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("stale partial checkpoint %s (%s) could not be removed: %s", path, why, exc)
            continue
        log.warning("removed stale partial checkpoint %s (%s)", path, why)
        removed.append(path)
    return removed


@contextlib.contextmanager
def checkpoint_lock(folder: Path, owner: dict[str, Any], on_wait: Optional[Callable[[dict[str, Any]], None]] = None,
                    what: Optional[str] = None) -> Iterator[Optional[FileLock]]:
    """Hold the lock of checkpoint ``folder`` while it is made: ``<parent>/.locks/<name>.lock``, for
    a defended checkpoint the defence-key lock ``harness run`` takes (``harness.pipeline.trial``),
    so two processes never train the same checkpoint at once; the second waits (``on_wait`` is
    called with the holder's owner first) and then finds it complete. Yields ``None`` without
    locking when ``folder`` is complete already, else the held ``FileLock`` (its heartbeat refreshed
    while held). Stale partial copies of ``folder`` are removed (``clean_stale_partials``)."""
    folder = Path(folder)
    if is_complete(folder):
        clean_stale_partials(folder)
        yield None
        return
    lock = FileLock(lock_path(folder.parent, folder.name), owner, what=what or f"checkpoint {folder.name}")
    try:
        lock.acquire(on_wait=on_wait)
    except OSError as exc:
        raise CheckpointError(f"cannot take the lock {lock.path} of checkpoint {folder.name}: "
                              f"{exc.strerror or exc}") from None
    beat = Heartbeat(lock).start()
    try:
        clean_stale_partials(folder, locked=True)
        yield lock
    finally:
        beat.stop()
        lock.release()


def save_model(model, tokenizer, folder: Path, meta: Optional[dict[str, Any]] = None) -> Path:
    folder = Path(folder)
    clean_stale_partials(folder)
    tmp = partial_folder(folder)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:  # e.g. disk full: free the space of the partial copy, keep the error
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(folder / MARKER, {"saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {})})
    return folder


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` (and the folder) to disk before it is renamed into place."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_marker(folder: Path) -> dict[str, Any]:
    """The completion marker of ``folder`` (checked), or ``CheckpointError`` in one line naming the
    folder and why there is none."""
    marker, why = _read_marker(folder)
    if marker is None:
        raise CheckpointError(f"checkpoint {str(folder)!r}: " + (f"its {MARKER} marker is damaged ({why})" if why else
                              f"no {MARKER} marker (not a complete checkpoint)"))
    return marker
