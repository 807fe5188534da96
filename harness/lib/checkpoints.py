"""Saving and finding model checkpoints (safetensors), with a completion marker.

A checkpoint folder is trusted only when it holds ``.complete`` (written last, atomically) —
a process killed while saving leaves a folder that is ignored and overwritten. Saving goes to
``<folder>.partial-<pid>`` first and is renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from harness.lib.store import atomic_write_json

MARKER = ".complete"


def is_complete(folder: Path) -> bool:
    return (Path(folder) / MARKER).exists()


def save_model(model, tokenizer, folder: Path, meta: Optional[dict[str, Any]] = None) -> Path:
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
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
