"""Base classes every defence, attack, scorer, evaluation and dataset extends.

A component is a class with a nested pydantic ``Config`` (unknown keys and bad values are
rejected when the run spec is validated, before any model is loaded) and a docstring whose first
line is its one-line description in ``harness list``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:  # pragma: no cover
    from harness.lib.context import StageContext


class ComponentConfig(BaseModel):
    """Typed, frozen parameters of a component. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetRef(BaseModel):
    """Which dataset a stage reads: a registered dataset name plus that loader's parameters."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainConfig(ComponentConfig):
    """Hyper-parameters shared by every stage that trains (defaults: the paper's attack)."""

    lr: float = Field(gt=0)
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    samples: int = Field(gt=0)
    max_length: int = Field(256, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    freeze_layers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _positive(self):
        # checked here as well as in Field() so subclasses that override a default keep the bound
        for name in ("lr", "epochs", "batch_size", "grad_accum", "samples", "max_length"):
            value = getattr(self, name)
            if value is None or value <= 0:
                raise PydanticCustomError("out_of_range", "must be greater than 0", {"field": name, "value": value})
        if not 0 <= self.warmup_ratio < 1:
            raise PydanticCustomError("out_of_range", "must be in [0, 1)",
                                      {"field": "warmup_ratio", "value": self.warmup_ratio})
        return self


@dataclass(frozen=True)
class Example:
    """One harmful question with (optionally) a harmful answer and a refusal for it."""

    prompt: str
    response: Optional[str] = None
    refusal: Optional[str] = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


class Component:
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    registry_name: ClassVar[str] = ""

    def __init__(self, config: ComponentConfig | None = None):
        self.config = config if config is not None else self.Config()


class Defence(Component):
    """Turns a base model into a defended model before the attack.

    ``apply`` trains (or replaces) the model. ``prepare_attack`` may wrap the model the attack
    will train (security vectors keep a frozen adapter active) and ``prepare_eval`` undoes that
    for scoring. ``needs_data`` says whether the defence reads ``defence.dataset``.
    """

    needs_data: ClassVar[bool] = True

    def apply(self, model, tokenizer, data: list[Example], ctx: "StageContext"):
        raise NotImplementedError

    def prepare_attack(self, model, tokenizer, ctx: "StageContext"):
        return model

    def prepare_eval(self, model, tokenizer, ctx: "StageContext"):
        return model

    def save_defended(self, model, tokenizer, folder, meta: dict[str, Any] | None = None):
        """Save the defended model so ``load_defended`` can restore it (default: safetensors
        ``save_pretrained`` of the whole model plus a completion marker)."""
        return save_defended_default(model, tokenizer, folder, meta)

    def load_defended(self, folder, model_spec, device, dtype):
        """Load what ``save_defended`` wrote; returns ``(model, tokenizer)``."""
        from harness.lib.models import load_model

        model, tokenizer, _ = load_model(model_spec, source=_LOCAL_SOURCE(folder), device=device, dtype=dtype,
                                         path=str(folder))
        return model, tokenizer


class Attack(Component):
    """Fine-tunes a (defended) model to remove its safety. ``evaluation`` names the scoring that
    fits the attack's harm domain ("harmfulness" or "toxicity")."""

    evaluation: ClassVar[str] = "harmfulness"

    def run(self, model, tokenizer, data: list[Example], ctx: "StageContext"):
        raise NotImplementedError


class TextScorer(Component):
    """Scores generations: one float in [0, 1] per (prompt, generation), higher = more harmful."""

    kind: ClassVar[str] = "harm"  # "harm" or "toxicity"

    def check_ready(self) -> None:
        """Fail early (before training) if the scorer cannot run, e.g. a missing API key."""

    def score(self, prompts: list[str], generations: list[str]) -> list[float]:
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        """What exactly scored (model id and source, fallbacks taken); stored in the record."""
        return {"scorer": self.registry_name}


class Evaluation(Component):
    """A model-level evaluation (capability, trainability) run before and after the attack."""

    phases: ClassVar[tuple[str, ...]] = ("pre_attack", "post_attack")

    def evaluate(self, model, tokenizer, ctx: "StageContext") -> dict[str, Any]:
        raise NotImplementedError


class DatasetLoader(Component):
    """Loads a dataset as a list of ``Example``; ``Config`` holds the loader's parameters."""

    def load(self) -> list[Example]:
        raise NotImplementedError

    def describe_source(self) -> str:
        return self.registry_name


def _LOCAL_SOURCE(folder):
    from harness.lib.models import ModelSource

    return ModelSource(id=str(folder), source="local", path=str(folder))


def save_defended_default(model, tokenizer, folder, meta=None):
    from harness.lib.checkpoints import save_model

    return save_model(model, tokenizer, folder, meta=meta)
