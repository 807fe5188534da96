"""Typed run specification, presets and ``--set`` overrides, validated at the edge.

A preset (YAML, ``harness/presets/*.yaml`` or any file) holds the model, the seed, the
evaluation settings and the parameters of every defence and attack it knows. Choosing
``--defence X --attack Y`` picks one entry of each; ``--set dotted.key=value`` then edits the
resolved spec (``attack.lr=3e-5``, ``defence.beta=0.001``, ``eval.samples=50``). Everything is
checked against the component's typed ``Config`` before any model is loaded; an error names the
field, the value and what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.components import ComponentConfig
from harness.errors import ConfigError
from harness.registry import ATTACKS, DEFENCES, METRICS

SCHEMA_VERSION = 1
PRESET_DIR = Path(__file__).parent / "presets"
EMBEDDED_MODEL = "smollm2-135m-instruct"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    id: str = EMBEDDED_MODEL
    revision: Optional[str] = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trust_remote_code: bool = False


class ComponentSpec(BaseModel):
    """``{name: ..., <params>}``; the params are validated by the component's own Config."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ScorerSpec(ComponentSpec):
    pass


class EvalSpec(Strict):
    harm_scorer: ScorerSpec = ScorerSpec(name="keyword_refusal")
    toxicity_scorer: ScorerSpec = ScorerSpec(name="detoxify")
    samples: int = Field(300, gt=0)
    max_new_tokens: int = Field(100, gt=0)
    batch_size: int = Field(16, gt=0)
    save_generations: int = Field(5, ge=0)
    extra: list[str] = Field(default_factory=list)
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("extra", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v


class RunSpec(Strict):
    preset: str = "smoke"
    model: ModelSpec = ModelSpec()
    defence: ComponentSpec
    attack: ComponentSpec
    eval: EvalSpec = EvalSpec()
    seed: int = 0
    disjoint: bool = True

    # ---- derived -------------------------------------------------------------------------
    def canonical(self) -> dict[str, Any]:
        """The full config as plain data, with validated component params (defaults filled)."""
        data = self.model_dump(mode="json")
        data["defence"] = {"name": self.defence.name, **defence_config(self).model_dump(mode="json")}
        data["attack"] = {"name": self.attack.name, **attack_config(self).model_dump(mode="json")}
        return data

    @property
    def trial_id(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
        return f"{self.defence.name}--{self.attack.name}--s{self.seed}--{digest}"

    def defence_key(self) -> str:
        """Id of the defended checkpoint: everything the defence stage depends on."""
        c = self.canonical()
        blob = json.dumps({"model": c["model"], "defence": c["defence"], "seed": c["seed"],
                           "disjoint": c["disjoint"]}, sort_keys=True)
        return f"{self.defence.name}--{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


# ---- component configs ---------------------------------------------------------------------
def _validate_component(kind: str, registry, spec: ComponentSpec, field: str) -> ComponentConfig:
    cls = registry.get(spec.name)
    try:
        return cls.Config(**spec.params())
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix=field, model=cls.Config)) from None


def defence_config(spec: RunSpec) -> ComponentConfig:
    return _validate_component("defence", DEFENCES, spec.defence, "defence")


def attack_config(spec: RunSpec) -> ComponentConfig:
    return _validate_component("attack", ATTACKS, spec.attack, "attack")


def scorer_config(spec: ScorerSpec, field: str) -> ComponentConfig:
    return _validate_component("metric", METRICS, spec, field)


def format_validation_error(exc: ValidationError, prefix: str = "", model: type | None = None) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        name = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        if err["type"] == "extra_forbidden":
            allowed = ""
            if model is not None and hasattr(model, "model_fields"):
                allowed = f"; allowed keys: {', '.join(sorted(model.model_fields))}"
            lines.append(f"field {name!r}: unknown key{allowed}")
        else:
            value = err.get("input")
            shown = repr(value) if not isinstance(value, dict) else "{...}"
            lines.append(f"field {name!r} = {shown}: {err['msg']}")
    return "invalid config: " + "; ".join(lines)


# ---- presets and overrides -------------------------------------------------------------------
def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            from harness.errors import UnknownComponentError

            raise UnknownComponentError("preset", name_or_path, preset_names())
    if not path.exists():
        raise ConfigError(f"preset file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"preset file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset file {str(path)!r} must hold a mapping, not {type(data).__name__}")
    data.setdefault("preset", path.stem)
    return data


PRESET_KEYS = {"preset", "model", "defence", "attack", "defences", "attacks", "defence_defaults",
               "attack_defaults", "eval", "seed", "disjoint", "description", "sweep"}


def parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def apply_override(data: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. attack.lr=3e-5")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if isinstance(child, str) and part in ("defence", "attack") and i == 0:
            child = node[part] = {"name": child}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {'.'.join(parts[: i + 1])} is not a mapping")
        node = child
    node[parts[-1]] = parse_value(raw)


def _component_entry(preset: dict[str, Any], kind: str, name: str, registry) -> dict[str, Any]:
    entries = preset.get(f"{kind}s") or {}
    params = copy.deepcopy(entries.get(name) or {})
    defaults = preset.get(f"{kind}_defaults") or {}
    if defaults:
        fields = registry.get(name).Config.model_fields
        for key, value in defaults.items():
            if key in fields and key not in params:
                params[key] = copy.deepcopy(value)
    return {"name": name, **params}


def resolve(
    preset: str = "smoke",
    *,
    defence: str | None = None,
    attack: str | None = None,
    model: str | None = None,
    seed: int | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> RunSpec:
    """Preset + CLI choices + ``--set`` overrides -> a validated ``RunSpec``."""
    raw = load_preset(preset)
    unknown = sorted(set(raw) - PRESET_KEYS)
    if unknown:
        raise ConfigError(f"preset {preset!r}: unknown key(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(sorted(PRESET_KEYS))}")
    d_name = defence or raw.get("defence") or "none"
    a_name = attack or raw.get("attack") or "harmfulqa"
    if isinstance(d_name, dict) or isinstance(a_name, dict):
        raise ConfigError("preset: 'defence' and 'attack' name the default choice; parameters go "
                          "under 'defences: {NAME: {...}}' and 'attacks: {NAME: {...}}'")
    DEFENCES.get(d_name)
    ATTACKS.get(a_name)
    data: dict[str, Any] = {
        "preset": raw.get("preset", preset),
        "model": copy.deepcopy(raw.get("model") or {}),
        "defence": _component_entry(raw, "defence", d_name, DEFENCES),
        "attack": _component_entry(raw, "attack", a_name, ATTACKS),
        "eval": copy.deepcopy(raw.get("eval") or {}),
        "seed": raw.get("seed", 0),
        "disjoint": raw.get("disjoint", True),
    }
    if model:
        data["model"]["id"] = model
    if seed is not None:
        data["seed"] = seed
    for assignment in sets:
        apply_override(data, assignment)
        for kind, registry in (("defence", DEFENCES), ("attack", ATTACKS)):
            if isinstance(data.get(kind), str):
                data[kind] = {"name": data[kind]}
            name = data[kind].get("name")
            if name is not None:
                registry.get(name)
    return validate(data)


def validate(data: dict[str, Any]) -> RunSpec:
    try:
        spec = RunSpec(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model=RunSpec)) from None
    # component parameters, scorers and evaluations: all checked now, before any model loads
    spec.canonical()
    scorer_config(spec.eval.harm_scorer, "eval.harm_scorer")
    scorer_config(spec.eval.toxicity_scorer, "eval.toxicity_scorer")
    for name in spec.eval.extra:
        METRICS.get(name)
    unknown = sorted(set(spec.eval.params) - set(spec.eval.extra))
    if unknown:
        raise ConfigError(f"field 'eval.params': parameters for {', '.join(unknown)} which is not in "
                          f"eval.extra ({', '.join(spec.eval.extra) or 'empty'})")
    for name in spec.eval.extra:
        cls = METRICS.get(name)
        try:
            cls.Config(**spec.eval.params.get(name, {}))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, prefix=f"eval.params.{name}", model=cls.Config)) from None
    return spec


def spec_from_record(config: dict[str, Any]) -> RunSpec:
    return validate(copy.deepcopy(config))
