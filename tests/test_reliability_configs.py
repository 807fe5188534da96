"""Hostile configs (issue 12): nothing is silently substituted and every wrong value fails at the
edge, in one line naming the field, with exit code 2 and before any model loads.

Classes: empty values (an unset shell variable), wrong-typed preset sections, text templates with
missing/unknown placeholders, sweep axes left empty or ``exclude`` rules that match nothing, and
the Perspective scorer offline (bounded pre-flight; declared fallback said, undeclared one refused).
"""

import json
import time

import pytest

from harness.api.config import resolve
from harness.api.errors import ConfigError
from harness.cli import main

FAST = ["eval.toxicity_scorer.name=keyword_refusal"]


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---- empty values: refused, never replaced by the preset's default -----------------------------
@pytest.mark.parametrize("flags, needles", [
    (["--defence", ""], ["--defence ''", "empty name", "known defences"]),
    (["--attack", " "], ["--attack", "empty name", "harmfulqa"]),
    (["--model", ""], ["--model ''", "empty model"]),
    (["--preset", ""], ["preset: empty name", "smoke"]),
    (["--eval", ""], ["--eval ''", "empty list"]),
    (["--set", "model.revision="], ["model.revision=", "empty value", "model.revision=null"]),
    (["--set", "defence.name=''"], ["defence.name", "must be a defence name"]),
])
def test_empty_values_are_refused(flags, needles, capsys, tmp_path):
    base = ["run", "--dry-run", "--output", str(tmp_path / "r"), "--set", FAST[0]]
    if "--defence" not in flags:
        base += ["--defence", "none"]
    msg = one_line_error(capsys, base + flags)
    for needle in needles:
        assert needle in msg, msg


def test_null_still_clears_a_field():
    spec = resolve("smoke", defence="none", sets=[*FAST, "model.revision=null"])
    assert spec.model.revision is None


# ---- wrong-typed preset sections -----------------------------------------------------------------
@pytest.mark.parametrize("text, needles", [
    ("attacks: [harmfulqa]\n", ["'attacks'", "mapping of attack names", "list"]),
    ("defences: 5\n", ["'defences'", "not int"]),
    ("attacks: {harmfulqa: [1, 2]}\n", ["'attacks.harmfulqa'", "mapping of parameters"]),
    ("attacks: {harmfulq: {lr: 1.0e-5}}\n", ["attacks.harmfulq", "Did you mean 'harmfulqa'"]),
    ("model: 5\n", ["'model'", "must be a mapping"]),
    ("eval: [samples]\n", ["'eval'", "must be a mapping"]),
    ("defence_defaults: [1]\n", ["'defence_defaults'", "must be a mapping"]),
    ("synth: fast\n", ["'synth'", "not str"]),
    ("attack: 5\n", ["'attack'", "attack name"]),
    ("defence: ''\n", ["'defence'", "defence name"]),
    ("1: 2\n", ["key 1 is not a string"]),
    ("", ["is empty", "mapping"]),
])
def test_wrong_typed_preset_sections(text, needles, tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        resolve(str(path), sets=FAST)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


@pytest.mark.parametrize("assignment, needle", [
    ("attack=5", "attack"),
    ("eval=3", "eval is not a mapping"),
    ("model=[1]", "'model'"),
    ("eval.params=[1]", "eval.params"),
])
def test_wrong_typed_set(assignment, needle):
    with pytest.raises(ConfigError) as info:
        resolve("smoke", sets=[assignment, *FAST])
    assert needle in str(info.value)


# ---- templates: validated at the edge, for every component that has one --------------------------
@pytest.mark.parametrize("sets, needles", [
    (["attack.template='Question: tell me\\nAnswer:'"], ["attack.template", "must contain {prompt}"]),
    (["attack.template='Q: {prompt} {question}'"], ["attack.template", "unknown placeholder {question}"]),
    (["attack.template='Q: {} {prompt}'"], ["attack.template", "unknown placeholder {}"]),
    (["attack.template='Q: {prompt'"], ["attack.template", "not a valid template"]),
    (["attack.template='Q: {prompt.upper}'"], ["attack.template", "unknown placeholder {prompt.upper}"]),
    (["eval.extra=[trainability]", "eval.params.trainability.template='Q {prompt}'"],
     ["eval.params.trainability.template", "only {input}"]),
    (["eval.extra=[answer_loss]", "eval.params.answer_loss.template='Q {input}'"],
     ["eval.params.answer_loss.template", "only {prompt}"]),
])
def test_bad_templates_fail_before_any_model(sets, needles):
    with pytest.raises(ConfigError) as info:
        resolve("smoke", defence="none", attack="harmfulqa", sets=[*FAST, *sets])
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, msg


def test_good_templates_pass():
    spec = resolve("smoke", defence="none", attack="harmfulqa",
                   sets=[*FAST, "attack.template='<u> {prompt} {{literal}} {prompt}'"])
    assert spec.attack.config.template.startswith("<u> {prompt}")


# ---- sweeps: nothing dropped, nothing matched by accident ---------------------------------------------
def sweep_error(tmp_path, capsys, text, *extra) -> str:
    path = tmp_path / "s.yaml"
    path.write_text("preset: smoke\nset: {eval.toxicity_scorer.name: keyword_refusal}\n" + text)
    return one_line_error(capsys, ["sweep", str(path), "--dry-run", "--num-gpus", "1",
                                   "--output", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("text, needles", [
    ("defences: [none, repnoise]\nexclude: [{defense: none}]\n", ["exclude[0]", "'defense'", "Did you mean 'defence'"]),
    ("defences: [none, repnoise]\nexclude: [{defence: nonee}]\n", ["exclude[0]", "defence = 'nonee'", "'repnoise'"]),
    ("attack_lr: [3.0e-5]\nexclude: [{attack_lr: 9.0e-5}]\n", ["attack_lr = 9e-05", "matches no value"]),
    ("exclude: [{}]\n", ["exclude[0]", "empty rule"]),
    ("defences: []\n", ["axis 'defences' is empty"]),
    ("seeds: []\n", ["axis 'seeds' is empty"]),
    ("grid: {attack.epochs: []}\n", ["grid axis 'attack.epochs' is empty"]),
])
def test_sweep_axes_and_excludes_are_checked(text, needles, tmp_path, capsys):
    msg = sweep_error(tmp_path, capsys, text)
    for needle in needles:
        assert needle in msg, msg


def test_sweep_exclude_that_matches_still_excludes(tmp_path):
    from harness.sweep.grid import expand, load_sweep_spec

    path = tmp_path / "s.yaml"
    path.write_text("preset: smoke\ndefences: [none, repnoise]\nattack_lr: [3.0e-5, 6.0e-5]\n"
                    "exclude: [{defence: none, attack_lr: 3e-5}]\n")  # 3e-5 is text in YAML: compared as a number
    spec, preset, _ = load_sweep_spec(str(path))
    cells = expand(spec, preset, extra_sets=FAST)
    assert len(cells) == 3
    assert not any(c.labels["defence"] == "none" and c.labels["attack_lr"] == 3e-5 for c in cells)


# ---- Perspective offline: seconds, and the substitution is said or refused ------------------------------
UNREACHABLE = "http://127.0.0.1:9/$discovery/rest?version=v1alpha1"


def perspective_components(fallback):
    from harness.pipeline.components import Components

    scorer = {"name": "perspective", "discovery_url": UNREACHABLE, "cache_dir": None, "max_retries": 6,
              "backoff_base": 5.0, "probe_timeout": 1.0}
    if fallback:
        scorer["fallback"] = fallback
    spec = resolve("smoke", defence="none", attack="toxicity", sets=[f"eval.toxicity_scorer={json.dumps(scorer)}"])
    return Components.build(spec)


def test_perspective_offline_without_fallback_fails_in_seconds(monkeypatch):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key-not-real-123456")
    comp = perspective_components(None)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="pre-flight: network error: cannot reach 127.0.0.1:9 within 1 s"):
        comp.check_ready()
    assert time.monotonic() - t0 < 4.0


def test_perspective_offline_with_fallback_is_said(monkeypatch, caplog):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key-not-real-123456")
    comp = perspective_components("keyword_refusal")
    t0 = time.monotonic()
    comp.check_ready()
    assert time.monotonic() - t0 < 4.0
    assert comp.fallback_from["scorer"] == "perspective"
    assert any("scored with fallback 'keyword_refusal'" in n for n in comp.notes)
    assert any(r.levelname == "WARNING" and "fallback" in r.getMessage() for r in caplog.records)


# ---- more of the same classes: an empty fallback, non-finite numbers, a bad key file, sweep names ------
@pytest.mark.parametrize("sets, needles", [
    (["eval.toxicity_scorer.fallback=''"], ["eval.toxicity_scorer.fallback", "must be a metric name"]),
    (["attack.lr=.inf"], ["attack.lr", "inf", "finite"]),
    (["eval.params.answer_loss.max_length=.nan"], ["eval.params.answer_loss.max_length"]),
])
def test_more_silent_values_are_refused(sets, needles):
    with pytest.raises(ConfigError) as info:
        resolve("smoke", defence="none", attack="harmfulqa", sets=[*FAST, *sets])
    for needle in needles:
        assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("kind, needle", [("binary", "binary"), ("folder", "is a folder")])
def test_perspective_key_file_that_is_not_a_key(kind, needle, tmp_path, monkeypatch):
    from harness.api.errors import SecretMissingError
    from harness.api.registry import METRICS

    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    path = tmp_path / "key"
    if kind == "binary":
        path.write_bytes(b"\0\xff\0")
    else:
        path.mkdir()
    cls = METRICS.get("perspective")
    scorer = cls(cls.Config(key_file=str(path), cache_dir=None))
    with pytest.raises(SecretMissingError, match=needle):
        scorer.check_ready()


@pytest.mark.parametrize("text, needles", [
    ("plugins: ['']\n", ["sweep plugins", "not a module name"]),
    ("name: ../../elsewhere\n", ["name '../../elsewhere'", "one folder name"]),
    ("models: ['']\n", ["sweep models", "not a model id"]),
])
def test_sweep_names_and_plugins(text, needles, tmp_path, capsys):
    msg = sweep_error(tmp_path, capsys, text)
    for needle in needles:
        assert needle in msg, msg
