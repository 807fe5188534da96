"""Which defended checkpoints to keep on disk (``--keep-checkpoints {all,last,none}``).

A defended 7B checkpoint is 13.5 GB in bf16 (27 GB as float32 master weights). ``all`` (the
default) keeps every one, so later trials on the same defence reuse it. ``last`` keeps only the
most recent: after a trial (``harness run``) or once every cell that needs a defended model has
its record (a sweep), the other complete defended checkpoints in the checkpoints folder are
removed. ``none`` removes each defended checkpoint as soon as the trials that need it are done (a
later trial on the same defence trains it again). Only complete checkpoint folders (the
``.complete`` marker) directly under the checkpoints folder are touched; caches and partial
copies are not. Every removal is logged.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Iterable

from harness.lib.checkpoints import is_complete

log = logging.getLogger("harness.retention")

POLICIES = ("all", "last", "none")


def defended_checkpoints(storage: Path) -> list[Path]:
    """The complete defended checkpoints directly under ``storage``."""
    storage = Path(storage)
    if not storage.is_dir():
        return []
    return sorted(p for p in storage.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
                  and ".partial-" not in p.name and is_complete(p))


def prune(storage: Path, policy: str, done: Iterable[Path], *, last: Path | None = None) -> list[Path]:
    """Apply ``policy`` after the checkpoints ``done`` are no longer needed; ``last``: the most
    recently used checkpoint (kept under ``last``). Returns the folders removed."""
    if policy not in POLICIES:
        raise ValueError(f"keep-checkpoints policy {policy!r}: choose one of {', '.join(POLICIES)}")
    if policy == "all":
        return []
    done = [Path(p) for p in done]
    if policy == "none":
        targets = [p for p in done if is_complete(p)]
    else:
        keep = Path(last).resolve() if last is not None else None
        targets = [p for p in defended_checkpoints(storage) if keep is None or p.resolve() != keep]
    removed = []
    for folder in targets:
        try:
            shutil.rmtree(folder)
        except OSError as exc:
            log.warning("keep-checkpoints=%s: could not remove %s: %s", policy, folder, exc)
            continue
        log.info("keep-checkpoints=%s: removed the defended checkpoint %s", policy, folder)
        removed.append(folder)
    return removed
