"""Composed attack: several attacks applied one after the other to the same model.

Real attackers chain what works, e.g. ablating the refusal direction (no training) and then
fine-tuning a LoRA adapter on the ablated model. In a preset or with ``--set``::

    attacks:
      chain:
        dataset: {name: smoke}
        samples: 32
        steps:
          - {name: refusal_ablation, harmless: {name: lm_eval_cot}, harmless_samples: 32}
          - {name: lora, lr: 1.0e-4, r: 8}

Each step is an attack of its own (any registered attack but ``chain``) with its own parameters,
validated against that attack's ``Config`` when the spec is (an error names
``attack.steps.<i>.<field>``). What the pipeline reads of an attack is shared and set on the chain,
not on a step: the attack rows (``dataset``, ``samples``; every step sees the same rows), the
evaluation (``eval_dataset``) and the text format (``template``, ``separator``); a step that sets
one of these is an error. Steps run in order on the model the previous step returned; an attack
whose result only the evaluation uses (``embedding``: its soft prompt lives in ``generate``) must
be the last step. Every step must score with the chain's evaluation (harmfulness).

The record's ``train.attack`` holds the summed ``steps`` and ``seconds``, the first trained
step's ``first_loss``, the last one's ``final_loss`` and, under ``stages``, each step's own
statistics (e.g. the refusal direction's layer and norm, then the LoRA losses). The attacker's
search space is the union of the steps' spaces under ``steps.<i>.<field>``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, PrivateAttr, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from harness.api.components import Attack, ComponentConfig, DatasetRef
from harness.api.config import format_validation_error
from harness.api.config import format_validation_error
from harness.api.errors import UnknownComponentError
from harness.api.registry import ATTACKS
from harness.api.space import Space, declared_space
from harness.lib.text import PROMPT_TEMPLATE, RESPONSE_SEPARATOR

#: set on the chain and passed to every step whose Config has the field
SHARED = ("dataset", "samples", "eval_dataset", "template", "separator")


def _step_error(i: int, message: str, value: Any) -> PydanticCustomError:
    return PydanticCustomError("chain_step", "{detail}", {"detail": message, "field": f"steps.{i}", "value": value})


@ATTACKS.register("chain")
class Chain(Attack):
    """Two or more attacks applied in sequence (e.g. refusal_ablation then lora)."""

    evaluation = "harmfulness"

    class Config(ComponentConfig):
        steps: list[dict[str, Any]] = Field(min_length=1)
        samples: int = Field(1000, gt=0)
        dataset: DatasetRef = DatasetRef(name="beavertails", split="30k_train")
        eval_dataset: DatasetRef = DatasetRef(name="beavertails", split="30k_test")
        template: str = PROMPT_TEMPLATE
        separator: str = RESPONSE_SEPARATOR
        _configs: list[tuple[str, ComponentConfig]] = PrivateAttr(default_factory=list)

        @model_validator(mode="after")
        def _validate_steps(self):
            configs, normalized = [], []
            for i, step in enumerate(self.steps):
                params = dict(step)
                name = params.pop("name", None)
                if not isinstance(name, str) or not name:
                    raise _step_error(i, f"needs a 'name' (an attack: {', '.join(ATTACKS.names())})", step)
                if name == "chain":
                    raise _step_error(i, "a chain cannot contain a chain; list its steps instead", name)
                try:
                    cls = ATTACKS.get(name)
                except UnknownComponentError as exc:
                    raise _step_error(i, str(exc), name) from None
                shared = sorted(set(params) & set(SHARED))
                if shared:
                    raise _step_error(i, f"{', '.join(shared)} set on a step; set it on the chain (attack.{shared[0]}): "
                                      "every step reads the chain's rows and text format", name)
                if cls.evaluation != Chain.evaluation:
                    raise _step_error(i, f"attack {name!r} is scored with {cls.evaluation!r}; a chain scores "
                                      f"{Chain.evaluation!r}", name)
                if getattr(cls, "must_be_last", False) and i != len(self.steps) - 1:
                    raise _step_error(i, f"attack {name!r} must be the last step (its result lives in generate, "
                                      "not in the weights a later step would train)", name)
                inherited = {k: getattr(self, k) for k in SHARED if k in cls.Config.model_fields}
                try:
                    cfg = cls.Config(**inherited, **params)
                except ValidationError as exc:
                    detail = format_validation_error(exc, model=cls.Config).removeprefix("invalid config: ")
                    raise _step_error(i, f"{name}: {detail}", name) from None
                configs.append((name, cfg))
                dumped = cfg.model_dump(mode="json")
                normalized.append({"name": name, **{k: v for k, v in dumped.items() if k not in SHARED}})
            object.__setattr__(self, "steps", normalized)  # defaults filled: the trial id covers them
            self._configs = configs
            return self

        @property
        def attack_needs(self) -> tuple[str, ...]:
            """The Example fields any step's rows need (``harness.lib.data.requests_for``)."""
            needs: dict[str, None] = {}
            for _, cfg in self._configs:
                needs.update(dict.fromkeys(getattr(cfg, "attack_needs", ("response",))))
            return tuple(needs)

        def step_configs(self) -> list[tuple[str, ComponentConfig]]:
            return list(self._configs)

    @classmethod
    def training_cost(cls, config) -> float:
        return float(sum(ATTACKS.get(n).training_cost(c) for n, c in config.step_configs()))

    @classmethod
    def trains_adapter_only(cls, config) -> bool:
        return all(ATTACKS.get(n).trains_adapter_only(c) for n, c in config.step_configs())

    @classmethod
    def search_space(cls, config) -> dict[str, Space]:
        """The union of the steps' declared spaces, keyed ``steps.<i>.<field>``."""
        out: dict[str, Space] = {}
        for i, (name, cfg) in enumerate(config.step_configs()):
            for key, space in declared_space(type(cfg)).items():
                if key not in SHARED:
                    out[f"steps.{i}.{key}"] = space
        return out

    def run(self, model, tokenizer, data, ctx):
        stages = []
        for i, (name, cfg) in enumerate(self.config.step_configs()):
            sub = ctx.child(ctx.stage)
            ctx.log.info("chain step %d/%d: %s", i + 1, len(self.config.steps), name)
            model = ATTACKS.get(name)(cfg).run(model, tokenizer, data, sub)
            stages.append({"attack": name, **(sub.stats.get("train") or {})})
        trained = [s for s in stages if s.get("first_loss") is not None]
        ctx.stats["train"] = {"steps": sum(int(s.get("steps") or 0) for s in stages),
                              "seconds": round(sum(float(s.get("seconds") or 0) for s in stages), 3),
                              "first_loss": trained[0]["first_loss"] if trained else None,
                              "final_loss": trained[-1]["final_loss"] if trained else None,
                              "losses": [x for s in trained for x in s.get("losses", [])],
                              "stages": stages}
        return model
