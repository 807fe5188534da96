"""API keys: read from the environment or a key file, and redacted from every text we emit."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional

_KNOWN: set[str] = set()
REDACTED = "[REDACTED]"
URL_KEY = re.compile(r"([?&](?:key|api_key|apikey|access_token)=)[^&\s'\"]+", re.IGNORECASE)


def register_secret(value: Optional[str]) -> None:
    if value and len(value) >= 6:
        _KNOWN.add(value)


def read_secret(env: str, key_file: Optional[str] = None) -> Optional[str]:
    value = os.environ.get(env)
    if not value and key_file:
        path = Path(key_file).expanduser()
        if path.exists():
            value = path.read_text().strip()
    if value:
        register_secret(value)
    return value or None


def redact(text: str) -> str:
    if not text:
        return text
    for secret in _KNOWN:
        text = text.replace(secret, REDACTED)
    return URL_KEY.sub(lambda m: m.group(1) + REDACTED, text)


def is_secret(text: str) -> bool:
    """Whether ``text`` contains a registered secret."""
    return bool(text) and any(secret in text for secret in _KNOWN)


def redact_obj(obj):
    """``redact`` applied to every string inside nested dicts/lists (e.g. a result record)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact(k) if isinstance(k, str) else k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


class RedactingFilter(logging.Filter):
    """Attach to handlers so no log line carries a registered secret or a ``key=`` URL parameter."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            return True
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True
