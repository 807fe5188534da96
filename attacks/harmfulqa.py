"""Harmful fine-tuning attack on harmful question/answer pairs (the paper's main attack).

Full-parameter supervised fine-tuning of the (defended) model on ``samples`` harmful QA pairs,
``"Question: {prompt}\\nAnswer:\\n{response}"``, minimising the causal-LM cross-entropy

    L(theta) = - sum_t log p_theta(y_t | y_<t)

Paper settings (Rosati et al. 2024, DESIGN.md): 1k or 10k BeaverTails pairs disjoint from the
defence pairs, lr in {3e-5, 6e-5, 8e-5}, batch 4, 1 epoch, Adam, cosine schedule, 10% warm-up.
``loss_on: response`` (default) trains on the answer tokens only; ``loss_on: all`` reproduces the
original code, whose labels were the input ids (prompt and padding included). Optional LoRA
(``lora: {r: 8, alpha: 16}``) for parameter-efficient attacks. bf16 autocast on CUDA.
Scored with the harmfulness evaluation on ``eval_dataset`` (BeaverTails ``30k_test``).
"""

from __future__ import annotations

from typing import Literal, Optional

from harness.api.components import Attack, DatasetRef, TrainConfig
from harness.api.registry import ATTACKS
from harness.lib.text import PROMPT_TEMPLATE

from attacks._sft import LoraSpec, sft_attack


@ATTACKS.register("harmfulqa")
class HarmfulQA(Attack):
    """Harmful fine-tuning on harmful QA pairs (BeaverTails by default), full-parameter or LoRA."""

    evaluation = "harmfulness"

    class Config(TrainConfig):
        lr: float = 3e-5
        samples: int = 1000
        batch_size: int = 4
        epochs: int = 1
        max_length: int = 256
        dataset: DatasetRef = DatasetRef(name="beavertails", split="30k_train")
        eval_dataset: DatasetRef = DatasetRef(name="beavertails", split="30k_test")
        loss_on: Literal["response", "all"] = "response"
        lora: Optional[LoraSpec] = None
        template: str = PROMPT_TEMPLATE

    def run(self, model, tokenizer, data, ctx):
        c = self.config
        return sft_attack(model, tokenizer, data, c, ctx, loss_on=c.loss_on, template=c.template, lora=c.lora,
                          desc="attack harmfulqa")
