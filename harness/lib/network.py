"""Is the Hugging Face hub (or any host) reachable? One fast check for every loader and scorer.

The hub client retries for about 50 s before it gives up offline; a single TCP connect with a
short timeout (through ``HTTPS_PROXY`` when set, in a daemon thread so a hanging DNS lookup is
cut off too) answers in at most ``timeout`` + 1 s.
"""

from __future__ import annotations

import os
import socket
import threading
from functools import lru_cache
from urllib.parse import urlparse


def truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """True when the user told the Hugging Face libraries not to touch the network."""
    return truthy_env("HF_HUB_OFFLINE") or truthy_env("TRANSFORMERS_OFFLINE")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def host_reachable(url: str, timeout: float = 2.0) -> bool:
    """TCP connect to ``url``'s host (or the HTTPS proxy) within ``timeout``."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy or url)
    if not target.hostname:
        return False
    port = target.port or (443 if (target.scheme or "https") == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((target.hostname, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """The hub is usable: not switched off by the environment and its host answers."""
    return not hub_offline() and host_reachable(hub_endpoint(), timeout)
