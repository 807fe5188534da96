import pytest

from harness.api.config import apply_override, resolve
from harness.api.errors import ConfigError, UnknownComponentError

TOX = "eval.toxicity_scorer.name=keyword_refusal"


def test_smoke_defaults_and_overrides():
    spec = resolve("smoke", sets=["attack.lr=3e-5", "attack.samples=10", TOX])
    c = spec.canonical()
    assert c["attack"]["lr"] == 3e-5 and c["attack"]["samples"] == 10
    assert c["attack"]["loss_on"] == "response" and c["attack"]["optimizer"] == "adam"
    assert spec.trial_id.startswith("none--harmfulqa--s0--")


def test_trial_id_is_stable_and_config_sensitive():
    a = resolve("smoke", sets=[TOX]).trial_id
    assert a == resolve("smoke", sets=[TOX]).trial_id
    assert a != resolve("smoke", sets=[TOX, "attack.lr=1e-5"]).trial_id
    assert a != resolve("smoke", sets=[TOX], seed=1).trial_id
    # a value equal to the default does not change the id
    assert a == resolve("smoke", sets=[TOX, "attack.optimizer=adam"]).trial_id


def test_defence_key_ignores_attack():
    a = resolve("smoke", sets=[TOX, "attack.lr=1e-5"])
    b = resolve("smoke", sets=[TOX, "attack.lr=2e-5"])
    assert a.defence_key() == b.defence_key() and a.trial_id != b.trial_id


@pytest.mark.parametrize("override, field", [
    ("attack.lr=-1", "attack.lr"),
    ("attack.lr=0", "attack.lr"),
    ("attack.batch_size=0", "attack.batch_size"),
    ("attack.samples=-5", "attack.samples"),
    ("attack.epochs=0", "attack.epochs"),
    ("attack.warmup_ratio=1.5", "attack.warmup_ratio"),
    ("attack.loss_on=prompt", "attack.loss_on"),
    ("attack.optimizr=adam", "attack.optimizr"),
    ("eval.samples=abc", "eval.samples"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens"),
    ("model.dtype=float8", "model.dtype"),
    ("seed=abc", "seed"),
    ("bogus=1", "bogus"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as exc:
        resolve("smoke", sets=[TOX, override])
    assert field in str(exc.value)


def test_unknown_components_and_presets():
    with pytest.raises(UnknownComponentError, match="Did you mean 'harmfulqa'"):
        resolve("smoke", attack="harmfulq")
    with pytest.raises(UnknownComponentError, match="unknown preset 'smok'.*Did you mean 'smoke'"):
        resolve("smok")
    with pytest.raises(UnknownComponentError, match="unknown metric"):
        resolve("smoke", sets=["eval.harm_scorer.name=nope"])


def test_set_parsing():
    data = {"attack": {"name": "harmfulqa"}}
    apply_override(data, "attack.lr=3e-5")
    apply_override(data, "attack.lora.r=4")
    apply_override(data, "eval.extra=capability,trainability")
    assert data["attack"]["lr"] == 3e-5 and isinstance(data["attack"]["lr"], float)
    assert data["attack"]["lora"] == {"r": 4}
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_override(data, "attack.lr")


def test_yaml_preset_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {id: x}\nunknown_key: 1\n")
    with pytest.raises(ConfigError, match="unknown_key"):
        resolve(str(bad))
    typed = tmp_path / "typed.yaml"
    typed.write_text("attacks: {harmfulqa: {lr: fast}}\n")
    with pytest.raises(ConfigError, match="attack.lr.*fast"):
        resolve(str(typed))
    typed.write_text("seed: [1, 2]\n")
    with pytest.raises(ConfigError, match="field 'seed'"):
        resolve(str(typed))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {id: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve(str(broken))


def test_resolved_spec_holds_the_typed_configs():
    from harness.api.registry import ATTACKS, DEFENCES, METRICS

    spec = resolve("smoke", defence="repnoise", sets=[TOX, "defence.beta=0.01", "eval.extra=trainability"])
    assert isinstance(spec.defence.config, DEFENCES.get("repnoise").Config) and spec.defence.config.beta == 0.01
    assert isinstance(spec.attack.config, ATTACKS.get("harmfulqa").Config)
    assert isinstance(spec.eval.harm_scorer.config, METRICS.get("keyword_refusal").Config)
    assert isinstance(spec.evaluation_config("trainability"), METRICS.get("trainability").Config)
    assert spec.canonical()["defence"]["beta"] == 0.01
    # a copy with a change is a new spec, validated again; equal specs compare equal
    changed = spec.model_copy(update={"seed": 5})
    assert changed.seed == 5 and changed.defence.config.beta == 0.01 and changed.trial_id != spec.trial_id
    assert resolve("smoke", defence="repnoise", sets=[TOX, "defence.beta=0.01", "eval.extra=trainability"]) == spec
    with pytest.raises(ConfigError, match="defence.beta"):
        spec.model_copy(update={"defence": {"name": "repnoise", "beta": -1}})


def test_spec_errors_come_before_component_imports():
    """A mistake in the spec's own fields is reported without importing any component module."""
    import subprocess
    import sys

    code = ("import sys\nfrom harness.api.config import resolve\nfrom harness.api.errors import ConfigError\n"
            "try:\n    resolve('smoke', defence='repnoise', sets=['eval.samples=0'])\n"
            "except ConfigError as e:\n    print('ERR', e)\n"
            "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in ('defences', 'attacks', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "ERR invalid config: field 'eval.samples'" in out and "LOADED []" in out
