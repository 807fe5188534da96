"""LoRA fine-tuning attack: harmful fine-tuning through a low-rank adapter (PEFT).

Method (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models"; used as a
harmful-fine-tuning attack by Lermen et al. 2023, "LoRA Fine-tuning Efficiently Undoes Safety
Training in Llama 2-Chat 70B"): every targeted weight matrix ``W`` (frozen) gets a trainable
low-rank update, and only ``A`` and ``B`` train on the harmful QA pairs,

    W' = W + (alpha / r) * B A,      B in R^{d x r} (zeros at start), A in R^{r x k}

    L(A, B) = - sum_t log p_{W'}(y_t | x, y_<t)        (answer tokens; ``loss_on: all`` as harmfulqa)

After training the update is merged into ``W`` (``merge_and_unload``), so the attacked model is an
ordinary model for the evaluation. Against a defence that hands the attack a PEFT model (security
vectors: its adapter active and frozen), the attack's adapter is added beside the defence's, both
active while only the attack's trains; its update is then merged into ``W`` and its adapter
removed, leaving the defence's adapter as it was (``attacks._sft``). Data, text format and
scheduler are harmfulqa's.

Defaults: rank ``r`` 8, ``alpha`` 16, dropout 0.05, ``target_modules`` null (PEFT's default for the
architecture: the attention query/value projections of Llama-style models), lr 1e-4 (an adapter
needs a larger step than full fine-tuning's 3e-5), batch 4, 1 epoch, Adam, cosine, 10% warm-up,
1000 BeaverTails pairs. Search space: lr log-uniform [1e-5, 1e-2], rank {4, 8, 16, 32, 64},
alpha {8, 16, 32, 64, 128}, and the SFT attack's samples/epochs/batch/optimizer/warm-up/loss_on.
"""

from __future__ import annotations

from typing import ClassVar, Optional

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from harness.api.registry import ATTACKS
from harness.api.space import searchable

from attacks._sft import LoraSpec, QAAttackConfig, SFTAttack


@ATTACKS.register("lora")
class LoRAAttack(SFTAttack):
    """Harmful fine-tuning through a LoRA adapter (PEFT), merged into the weights afterwards."""

    evaluation = "harmfulness"

    class Config(QAAttackConfig):
        lr: float = searchable(1e-4, {"log": [1e-5, 1e-2]}, gt=0)
        r: int = searchable(8, {"choice": [4, 8, 16, 32, 64]}, gt=0)
        alpha: int = searchable(16, {"choice": [8, 16, 32, 64, 128]}, gt=0)
        dropout: float = Field(0.05, ge=0, lt=1)
        target_modules: Optional[list[str]] = None  # None: PEFT's default for the architecture
        search_ranges: ClassVar[dict] = {"lora": None}  # r/alpha are the adapter's axes here

        @model_validator(mode="after")
        def _no_nested_lora(self):
            if self.lora is not None:
                raise PydanticCustomError("lora_attack", "the lora attack takes r, alpha, dropout and target_modules "
                                          "directly; leave lora unset", {"field": "lora", "value": self.lora})
            if self.target_modules is not None and not self.target_modules:
                raise PydanticCustomError("lora_attack", "must name at least one module (or be null for PEFT's "
                                          "default)", {"field": "target_modules", "value": self.target_modules})
            return self

        def spec(self) -> LoraSpec:
            return LoraSpec(r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules)

    @classmethod
    def trains_adapter_only(cls, config) -> bool:
        return True

    def lora_spec(self) -> LoraSpec:
        return self.config.spec()

    def run(self, model, tokenizer, data, ctx):
        c = self.config
        attacked = super().run(model, tokenizer, data, ctx)
        train = ctx.stats.get("train")
        if train is not None:
            train.update({"lora_r": c.r, "lora_alpha": c.alpha, "lora_targets": c.target_modules})
        return attacked
