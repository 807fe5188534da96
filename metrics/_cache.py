"""A small on-disk cache for API scores: one JSON file per key, written atomically.

Keys are SHA-256 digests of a JSON list of the parts that determine the answer (attribute,
languages, text, ...), so the text itself is not stored in file names. Each entry is written to a
temporary file and renamed into place, so concurrent writers (several Ray tasks on one machine)
never leave a half-written file; a corrupt or unreadable entry counts as a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence


def cache_key(parts: Sequence[Any]) -> str:
    blob = json.dumps(list(parts), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class DiskCache:
    """``get(parts)`` / ``put(parts, value)`` under ``root``; ``root=None`` disables caching."""

    def __init__(self, root: Optional[str | os.PathLike]):
        self.root = Path(root).expanduser() if root else None
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def get(self, parts: Sequence[Any]) -> Optional[Any]:
        if self.root is None:
            self.misses += 1
            return None
        path = self._path(cache_key(parts))
        try:
            value = json.loads(path.read_text(encoding="utf-8"))["value"]
        except (OSError, ValueError, KeyError, TypeError):
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, parts: Sequence[Any], value: Any, **meta: Any) -> None:
        if self.root is None:
            return
        path = self._path(cache_key(parts))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:8]}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"value": value, **meta}, fh)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
