"""Where a result came from: package versions, git commit, device, host."""

from __future__ import annotations

import platform
import socket
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import harness

PACKAGES = ("torch", "transformers", "datasets", "lm_eval", "peft", "ray", "pandas", "detoxify",
            "google-api-python-client", "safetensors", "accelerate", "numpy", "pydantic", "rouge_score")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@lru_cache(maxsize=1)
def git_commit() -> dict[str, object]:
    root = Path(harness.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def device_name(device) -> str:
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu ({platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores)"


def environment(device) -> dict[str, object]:
    return {"harness": harness.__version__, "python": platform.python_version(), "packages": package_versions(),
            "git": git_commit(), "device": device_name(device), "hostname": socket.gethostname()}
