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
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from harness.lib.locks import hostname, pid_alive
from harness.lib.store import atomic_write_json

log = logging.getLogger("harness.checkpoints")

MARKER = ".complete"
STALE_PARTIAL_S = 3600.0
_PARTIAL = re.compile(r"^(?P<name>.+)\.partial-(?P<pid>\d+)(?:@(?P<host>.+))?$")


def is_complete(folder: Path) -> bool:
    return (Path(folder) / MARKER).exists()


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
    return json.loads((Path(folder) / MARKER).read_text())
