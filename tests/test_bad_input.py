"""Bad input: each case fails with a one-line message that names the field or value and what is
allowed, and it fails before any model is loaded and before any record is written."""

import json
import sys
from pathlib import Path

import pytest

import fault_driver
from harness.cli import main
from harness.api.config import resolve
from harness.api.errors import ConfigError, DataError, ModelUnavailableError, UnknownComponentError
from harness.pipeline.trial import run_trial

FAST = fault_driver.FAST
TD = fault_driver.TEST_DEFENCE




class ModelLoaded(AssertionError):
    pass


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to load a model (harness loader or transformers) fails the test."""
    import transformers

    import harness.lib.models
    import harness.pipeline.trial

    def boom(*args, **kwargs):
        raise ModelLoaded("a model was loaded before the bad input was reported")

    original = harness.lib.models.load_model
    for module in list(sys.modules.values()):  # every module that imported the loader by name
        if getattr(module, "load_model", None) is original:
            monkeypatch.setattr(module, "load_model", boom)
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer,
                transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(cls, "from_pretrained", boom)


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_dir, no_model_loads):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    fault_driver.register(monkeypatch)
    from harness.lib.data import _LOADED

    _LOADED.clear()  # data files of this test only
    data = tmp_path / "data"
    data.mkdir()
    return {"tmp": tmp_path, "tiny": str(tiny_dir), "data": data}


def jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def qa(n, start=0, prefix="question"):
    return [{"prompt": f"{prefix} {i}", "response": f"answer {i}", "refusal": "No."} for i in range(start, start + n)]


# Each case: id -> (builder, expected error type, substrings the message must hold).
# A builder gets the env dict and returns kwargs for resolve() (plus optional "preset_text").
def local_attack(path, extra=()):
    return [f"attack.dataset={{name: local, path: {path}}}", f"attack.eval_dataset={{name: local, path: {path}}}",
            "eval.samples=2", "attack.samples=2", *extra]


CASES = {
    # unknown names, with suggestions
    "unknown defence": (lambda e: dict(defence="nonee"), UnknownComponentError, ["'nonee'", "Did you mean 'none'"]),
    "unknown attack": (lambda e: dict(attack="harmfulq"), UnknownComponentError, ["'harmfulq'", "'harmfulqa'"]),
    "unknown harm scorer": (lambda e: dict(sets=["eval.harm_scorer.name=keyword_refusl"]), UnknownComponentError,
                            ["unknown metric 'keyword_refusl'", "Did you mean 'keyword_refusal'"]),
    "unknown extra evaluation": (lambda e: dict(sets=["eval.extra=capabilty"]), UnknownComponentError,
                                 ["'capabilty'", "'capability'"]),
    "unknown attack dataset": (lambda e: dict(sets=["attack.dataset.name=smok"]), UnknownComponentError,
                               ["attack.dataset.name", "unknown dataset 'smok'", "Did you mean 'smoke'"]),
    "unknown defence dataset": (lambda e: dict(defence=TD, sets=["defence.dataset.name=beavertail"]),
                                UnknownComponentError, ["defence.dataset.name", "'beavertails'"]),
    "unknown dataset param": (lambda e: dict(sets=["attack.eval_dataset.splt=test"]), ConfigError,
                              ["attack.eval_dataset.splt", "unknown key", "allowed keys: donotanswer_files, sources"]),
    "local dataset without path": (lambda e: dict(sets=["attack.dataset={name: local}"]), ConfigError,
                                   ["attack.dataset.path", "required"]),
    "unknown preset": (lambda e: dict(preset="smok"), UnknownComponentError, ["unknown preset 'smok'", "'smoke'"]),
    # numbers out of range
    "negative lr": (lambda e: dict(sets=["attack.lr=-3e-5"]), ConfigError, ["attack.lr", "-3e-05", "greater than 0"]),
    "zero lr": (lambda e: dict(sets=["attack.lr=0"]), ConfigError, ["attack.lr", "= 0", "greater than 0"]),
    "zero defence lr": (lambda e: dict(defence=TD, sets=["defence.lr=0"]), ConfigError, ["defence.lr", "greater than 0"]),
    "zero batch size": (lambda e: dict(sets=["attack.batch_size=0"]), ConfigError, ["attack.batch_size", "greater than 0"]),
    "negative defence batch": (lambda e: dict(defence=TD, sets=["defence.batch_size=-4"]), ConfigError,
                               ["defence.batch_size", "-4"]),
    "zero eval batch size": (lambda e: dict(sets=["eval.batch_size=0"]), ConfigError, ["eval.batch_size", "greater than 0"]),
    "negative sample count": (lambda e: dict(sets=["attack.samples=-5"]), ConfigError, ["attack.samples", "-5"]),
    "zero eval samples": (lambda e: dict(sets=["eval.samples=0"]), ConfigError, ["eval.samples", "greater than 0"]),
    "zero epochs": (lambda e: dict(sets=["attack.epochs=0"]), ConfigError, ["attack.epochs", "greater than 0"]),
    "negative defence epochs": (lambda e: dict(defence=TD, sets=["defence.epochs=-1"]), ConfigError,
                                ["defence.epochs", "-1"]),
    "warmup ratio 1": (lambda e: dict(sets=["attack.warmup_ratio=1"]), ConfigError, ["attack.warmup_ratio", "less than 1"]),
    # wrong types and unknown keys on the command line
    "lr not a number": (lambda e: dict(sets=["attack.lr=fast"]), ConfigError, ["attack.lr", "'fast'"]),
    "bad dtype": (lambda e: dict(sets=["model.dtype=float8"]), ConfigError, ["model.dtype", "'float8'", "bfloat16"]),
    "trust_remote_code not a bool": (lambda e: dict(sets=["model.trust_remote_code=maybe"]), ConfigError,
                                     ["model.trust_remote_code", "'maybe'"]),
    "unknown attack key": (lambda e: dict(sets=["attack.optimizr=adam"]), ConfigError,
                           ["attack.optimizr", "unknown key", "optimizer"]),
    "--set without =": (lambda e: dict(sets=["attack.lr"]), ConfigError, ["attack.lr", "key=value"]),
    "params for an unknown evaluation": (lambda e: dict(sets=["eval.params.capabilty={tasks: [x]}"]), ConfigError,
                                         ["capabilty", "Did you mean 'capability'"]),
    "bad params of an evaluation": (lambda e: dict(sets=["eval.params.capability.limit=-3"]), ConfigError,
                                    ["eval.params.capability.limit", "-3"]),
    "API key in a config value": (lambda e: dict(sets=["eval.toxicity_scorer.name=perspective",
                                                       "eval.toxicity_scorer.discovery_url=http://h/x?key=AIzaSECRET99"]),
                                  ConfigError, ["eval.toxicity_scorer.discovery_url", "environment variable or a key file"]),
    # YAML presets
    "yaml unknown top-level key": (lambda e: dict(preset_text="model: {id: x}\nlearning_rate: 1\n"), ConfigError,
                                   ["learning_rate", "unknown key", "allowed"]),
    "yaml unknown attack key": (lambda e: dict(preset_text="attacks: {harmfulqa: {lrate: 1e-5}}\n"), ConfigError,
                                ["attack.lrate", "unknown key"]),
    "yaml wrong type": (lambda e: dict(preset_text="attacks: {harmfulqa: {samples: many}}\n"), ConfigError,
                        ["attack.samples", "'many'"]),
    "yaml seed list": (lambda e: dict(preset_text="seed: [1, 2]\n"), ConfigError, ["seed", "[1, 2]"]),
    "yaml eval wrong type": (lambda e: dict(preset_text="eval: {samples: 1.5}\n"), ConfigError, ["eval.samples", "1.5"]),
    "yaml unknown model key": (lambda e: dict(preset_text="model: {idd: x}\n"), ConfigError, ["model.idd", "unknown key"]),
    "yaml not a mapping": (lambda e: dict(preset_text="- a\n- b\n"), ConfigError, ["must hold a mapping", "list"]),
    "yaml syntax": (lambda e: dict(preset_text="seed: 1\nmodel: {id: [\n"), ConfigError, ["not valid YAML", "line 3"]),
    # models
    "hub model offline": (lambda e: dict(model="meta-llama/Llama-2-7b-chat-hf"), ModelUnavailableError,
                          ["'meta-llama/Llama-2-7b-chat-hf'", "hub is unreachable", "--model DIR"]),
    "folder without config.json": (lambda e: dict(model=str(e["data"])), ModelUnavailableError,
                                   ["model.id", "no config.json"]),
    # data (read before the model loads)
    "more attack samples than the data": (
        lambda e: dict(sets=local_attack(jsonl(e["data"] / "ten.jsonl", qa(10)), ["attack.samples=20"])),
        DataError, ["holds 10 examples", "attack.samples=20", "eval.samples=2"]),
    "more eval samples than the data": (
        lambda e: dict(sets=local_attack(jsonl(e["data"] / "five.jsonl", qa(5)), ["eval.samples=9"])),
        DataError, ["holds 5 examples", "eval.samples=9"]),
    "defence and attack data overlap": (
        lambda e: dict(defence=TD, sets=local_attack(jsonl(e["data"] / "a.jsonl", qa(10)), [
            f"defence.dataset={{name: local, path: {jsonl(e['data'] / 'd.jsonl', qa(10, start=0))}}}",
            "defence.samples=10"])),
        DataError, ["defence and attack data share", "disjoint", "disjoint=false"]),
    "empty local file": (lambda e: dict(sets=local_attack(_write(e["data"] / "empty.jsonl", "\n"))), DataError,
                         ["empty.jsonl", "is empty"]),
    "malformed jsonl line": (
        lambda e: dict(sets=local_attack(_write(e["data"] / "bad.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n'))),
        DataError, ["bad.jsonl", "line 3", "invalid JSON"]),
    "jsonl row not an object": (lambda e: dict(sets=local_attack(_write(e["data"] / "list.jsonl", '{"prompt": "a"}\n[1]\n'))),
                                DataError, ["list.jsonl", "line 2", "JSON object"]),
    "malformed json file": (lambda e: dict(sets=local_attack(_write(e["data"] / "bad.json", '[{"prompt": "a"},\n {"prompt" "b"}]'))),
                            DataError, ["bad.json", "line 2"]),
    "csv row with extra cells": (lambda e: dict(sets=local_attack(_write(e["data"] / "bad.csv", "prompt,response\na,b\nc,d,e\n"))),
                                 DataError, ["bad.csv", "line 3", "more cells"]),
    "row without a prompt": (lambda e: dict(sets=local_attack(jsonl(e["data"] / "np.jsonl", [{"prompt": "a"}, {"text": "b"}]))),
                             DataError, ["np.jsonl", "line 2", "'prompt'"]),
    "missing data file": (lambda e: dict(sets=local_attack(str(e["data"] / "nope.jsonl"))), DataError,
                          ["nope.jsonl", "does not exist"]),
    "unknown data format": (lambda e: dict(sets=local_attack(_write(e["data"] / "rows.txt", "a\nb\n"))), DataError,
                            ["rows.txt", "unknown format", ".jsonl"]),
}


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def attempt(e, kwargs):
    """resolve + run_trial, as `harness run` does."""
    kwargs = dict(kwargs)
    preset = kwargs.pop("preset", "smoke")
    if "preset_text" in kwargs:
        path = e["tmp"] / "preset.yaml"
        path.write_text(kwargs.pop("preset_text"))
        preset = str(path)
    kwargs.setdefault("model", e["tiny"])
    sets = [FAST[0]] + list(kwargs.pop("sets", []))
    spec = resolve(preset, sets=sets, **kwargs)
    return run_trial(spec, e["tmp"] / "results", progress=False)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input(case, env):
    build, err_type, needles = CASES[case]
    with pytest.raises(err_type) as info:
        attempt(env, build(env))
    assert not isinstance(info.value, ModelLoaded)
    msg = str(info.value)
    assert "\n" not in msg.strip(), f"not one line: {msg!r}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert "AIzaSECRET99" not in msg  # a key in a config value is named by its field, never shown
    # nothing was started: no record, no checkpoint
    results = env["tmp"] / "results"
    assert not results.exists() or not any(results.rglob("*.json")), list(results.rglob("*"))


def test_table_is_big_enough():
    assert len(CASES) >= 20


def test_good_local_data_passes_the_preflight(env):
    """The same path with valid data gets as far as loading the model (the guard fires)."""
    sets = local_attack(jsonl(env["data"] / "ok.jsonl", qa(10)))
    rec = attempt(env, dict(sets=sets))
    assert rec.status == "error" and rec.error.type == "ModelLoaded" and rec.error.stage == "setup"


@pytest.mark.parametrize("sets, needles", [
    (["attack.dataset.name=smok"], ["attack.dataset.name", "Did you mean 'smoke'"]),
    (["attack.dataset.split=x"], ["attack.dataset.split", "unknown key"]),
    (["attack.lr=-1"], ["attack.lr", "-1"]),
])
def test_cli_dry_run_rejects(sets, needles, capsys):
    args = ["run", "--defence", "none", "--attack", "harmfulqa", "--dry-run", "--set", FAST[0]]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    for needle in needles:
        assert needle in err


def test_cli_run_bad_data_file_exit_2(env, capsys):
    bad = _write(env["data"] / "bad.jsonl", '{"prompt": "a"}\n{oops\n')
    args = ["run", "--defence", "none", "--attack", "harmfulqa", "--model", env["tiny"], "--output",
            str(env["tmp"] / "results"), "--no-progress"]
    for s in [FAST[0]] + local_attack(bad):
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err


def test_each_component_config_is_validated_once(env, monkeypatch):
    """`harness run` validates the attack's and the defence's typed config once, at the edge;
    every later stage reads the spec's typed config (counted up to the model load, which the
    guard turns into an error record)."""
    from collections import Counter

    from pydantic import model_validator

    from harness.api.registry import ATTACKS, DEFENCES

    counts: Counter = Counter()

    def count(registry, name):
        cls = registry.get(name)

        class Counted(cls.Config):
            @model_validator(mode="after")
            def _count(self):
                counts[name] += 1
                return self

        monkeypatch.setattr(cls, "Config", Counted)

    count(ATTACKS, "harmfulqa")
    count(DEFENCES, "none")
    sets = [FAST[0], *local_attack(jsonl(env["data"] / "ok.jsonl", qa(10)))]
    argv = ["run", "--defence", "none", "--attack", "harmfulqa", "--model", env["tiny"], "--no-progress",
            "--output", str(env["tmp"] / "results")] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 1  # the record says: ModelLoaded in setup
    assert counts == {"harmfulqa": 1, "none": 1}, counts
