"""Who is running a trial, and locks that die with the process holding them.

``FileLock`` is an exclusive ``fcntl.flock`` on a small file: the kernel releases it when its holder
exits, however it exits (SIGKILL included), so a lock is never left behind by a dead process.
The file itself stays (deleting a lock file races with a process opening it); while held it
contains the holder's ``owner`` (below), which a second process reads to say whom it waits for,
and a heartbeat the holder's ``Heartbeat`` thread refreshes every ``HEARTBEAT_S`` seconds.

The locks the pipeline takes (``harness.pipeline.trial``):

- ``<results>/.locks/<trial_id>.lock`` for the whole trial: a second run of the same trial waits
  for the first, then skips it if the first finished it (or runs it if the first did not);
- ``<checkpoints>/.locks/<defence key>.lock`` while the defence stage runs: a second trial on the
  same defended model (another attack) waits, then reuses the checkpoint instead of training it too.

An ``owner`` (``TrialRecord.owner``) is ``{pid, host, run_id, started, heartbeat}`` (``heartbeat``:
Unix time of the last sign of life). ``owner_state`` decides whether a ``running`` record's process
is ``alive``, ``dead`` or ``unknown``: the trial lock held -> alive; on this host, a pid that no
longer exists or a lock nobody holds -> dead; on another host, no heartbeat for ``STALE_S`` -> dead.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger("harness.locks")

LOCK_DIR = ".locks"
HEARTBEAT_S = 30.0
"""How often a holder refreshes the heartbeat in its lock file."""
STALE_S = 300.0
"""A heartbeat older than this (from another host, where the pid cannot be checked) means dead."""


def hostname() -> str:
    return socket.gethostname()


def new_owner() -> dict[str, Any]:
    """The ``owner`` of a run starting now in this process."""
    t = time.time()
    return {"pid": os.getpid(), "host": hostname(), "run_id": uuid.uuid4().hex[:12], "started": round(t, 3),
            "heartbeat": round(t, 3)}


def pid_alive(pid: Any) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock_path(folder: str | os.PathLike, name: str) -> Path:
    return Path(folder) / LOCK_DIR / f"{name}.lock"


def read_lock_owner(path: Path) -> dict[str, Any]:
    """The owner a lock file names (``{}`` when it cannot be read: empty, being written, gone)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lock_held(path: Path) -> Optional[bool]:
    """Whether some process holds the lock of ``path`` now (``None``: no such file or it cannot be
    opened). Probing takes the lock for an instant if it is free."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return True
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def describe_owner(owner: dict[str, Any]) -> str:
    if not owner:
        return "an unknown process"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"


def owner_state(owner: Optional[dict[str, Any]], lock: Optional[Path] = None, *, now: Optional[float] = None,
                stale_s: float = STALE_S) -> tuple[str, str]:
    """``(state, reason)`` of the process that wrote a ``running`` record: ``alive``, ``dead`` or
    ``unknown`` (nothing to tell by: no owner, no lock file), with one line saying why."""
    owner = dict(owner or {})
    now = time.time() if now is None else now
    held = lock_held(lock) if lock is not None else None
    lock_owner = read_lock_owner(lock) if lock is not None and held is not None else {}
    if held and (not owner.get("run_id") or lock_owner.get("run_id") in (None, owner.get("run_id"))):
        return "alive", f"{describe_owner(lock_owner or owner)} holds {lock}"
    beats = [b for b in (owner.get("heartbeat"),
                         lock_owner.get("heartbeat") if lock_owner.get("run_id") == owner.get("run_id") else None)
             if isinstance(b, (int, float))]
    beat_age = now - max(beats) if beats else None
    beat_text = f"last heartbeat {beat_age:.0f}s ago" if beat_age is not None else "no heartbeat"
    if not owner.get("pid"):
        if held is False:
            return "dead", f"no process holds the trial lock {lock}"
        return "unknown", "the record names no owner process"
    if owner.get("host") == hostname():
        if not pid_alive(owner["pid"]):
            return "dead", f"{describe_owner(owner)} no longer exists ({beat_text})"
        if held is False:
            return "dead", f"{describe_owner(owner)} does not hold the trial lock (its pid was reused; {beat_text})"
        if held:  # held by another run of the same trial: this record's own run is gone
            return "dead", f"its run ended; {describe_owner(lock_owner)} is running the trial again"
        return "alive", f"{describe_owner(owner)} exists ({beat_text})"
    if beat_age is None:
        return "unknown", f"{describe_owner(owner)}: another host and no heartbeat"
    if beat_age > stale_s:
        return "dead", f"{describe_owner(owner)}: {beat_text} (stale after {stale_s:.0f}s)"
    return "alive", f"{describe_owner(owner)}: {beat_text}"


class FileLock:
    """An exclusive ``flock`` on ``path`` naming its ``owner``; released by ``release`` or by the
    holder's death. ``acquire(wait=True)`` blocks until free; ``wait=False`` returns ``False`` at once
    when another process holds it. ``waited_for`` is the owner that held it when ``acquire`` began
    (``None`` if it was free), ``waited_s`` how long it waited."""

    def __init__(self, path: str | os.PathLike, owner: Optional[dict[str, Any]] = None, what: str = "lock"):
        self.path = Path(path)
        self.owner = owner if owner is not None else new_owner()
        self.what = what
        self.fd: Optional[int] = None
        self.waited_for: Optional[dict[str, Any]] = None
        self.waited_s = 0.0
        self._write_lock = threading.Lock()

    def acquire(self, wait: bool = True, on_wait: Optional[Callable[[dict[str, Any]], None]] = None) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o664)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                self.waited_for = read_lock_owner(self.path)
                if not wait:
                    os.close(fd)
                    return False
                if on_wait is not None:
                    on_wait(self.waited_for)
                t0 = time.monotonic()
                fcntl.flock(fd, fcntl.LOCK_EX)
                self.waited_s = time.monotonic() - t0
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self._write_owner()
        return True

    def _write_owner(self) -> None:
        with self._write_lock:
            if self.fd is None:
                return
            data = (json.dumps({**self.owner, "what": self.what}) + "\n").encode()
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)

    def heartbeat(self) -> None:
        """Refresh the heartbeat in the lock file (and in ``owner``)."""
        self.owner["heartbeat"] = round(time.time(), 3)
        try:
            self._write_owner()
        except OSError as exc:  # a full disk must not kill the run
            log.debug("heartbeat of %s not written: %s", self.path, exc)

    def release(self) -> None:
        with self._write_lock:
            if self.fd is None:
                return
            fd, self.fd = self.fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Heartbeat:
    """A daemon thread calling ``lock.heartbeat()`` every ``period`` seconds until ``stop``."""

    def __init__(self, lock: FileLock, period: float = HEARTBEAT_S):
        self.lock, self.period = lock, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat:{lock.path.name}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.lock.heartbeat()

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
