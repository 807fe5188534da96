import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.api.components import ComponentConfig, Defence
from harness.api.errors import UnknownComponentError
from harness.api.registry import ATTACKS, DEFENCES, METRICS, Registry

ROOT = Path(__file__).resolve().parent.parent


def test_builtins_registered():
    assert "none" in DEFENCES.names()
    assert {"harmfulqa", "toxicity"} <= set(ATTACKS.names())
    assert "keyword_refusal" in METRICS.names()


def test_unknown_name_suggests_close_match():
    with pytest.raises(UnknownComponentError) as exc:
        ATTACKS.get("harmfulq")
    msg = str(exc.value)
    assert "unknown attack 'harmfulq'" in msg
    assert "Did you mean 'harmfulqa'" in msg
    assert "toxicity" in msg  # the list of known names


def test_unknown_name_without_close_match_lists_known():
    with pytest.raises(UnknownComponentError) as exc:
        ATTACKS.get("zzzzzz")
    assert "Did you mean" not in str(exc.value)
    assert "harmfulqa" in str(exc.value)


def test_decorator_and_duplicate():
    reg = Registry("widget", "harness.test-widgets")

    @reg.register("a")
    class A(Defence):
        """An A."""

    assert reg.get("a") is A and A.registry_name == "a"
    reg.add("a", A)  # same object again: fine
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("a", type("B", (Defence,), {}))


def test_component_added_by_installed_package_via_entry_point(tmp_path):
    """pip-installs examples/plugin_defence into a target folder and runs `harness list` and a
    dry run with it on the path: the defence appears without any change to this repository."""
    import shutil

    target = tmp_path / "site"
    source = tmp_path / "plugin_defence"  # build from a copy: the source tree stays clean
    shutil.copytree(ROOT / "examples" / "plugin_defence", source)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True)
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-m", "harness.cli", "list"], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "weight_noise" in out and "Example plug-in defence" in out
    dry = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--defence", "weight_noise", "--attack",
                          "harmfulqa", "--set", "defence.sigma=0.5", "--set",
                          "eval.toxicity_scorer.name=keyword_refusal", "--dry-run"],
                         env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert '"sigma": 0.5' in dry.stdout
    bad = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--defence", "weight_noise", "--attack",
                          "harmfulqa", "--set", "defence.sigma=-1", "--dry-run"], env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "defence.sigma" in bad.stderr
