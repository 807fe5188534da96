"""Supervised fine-tuning shared by the harmful-QA and toxicity attacks."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from harness.api.components import Example
from harness.lib.text import PROMPT_TEMPLATE, batches, sft_batch
from harness.lib.training import train_loop


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Optional[list[str]] = None  # None: peft's default for the architecture


def sft_attack(model, tokenizer, data: list[Example], cfg, ctx, *, loss_on: str, template: str = PROMPT_TEMPLATE,
               lora: Optional[LoraSpec] = None, desc: str = "attack"):
    """Fine-tune on (prompt, response) pairs; returns the attacked model."""
    data = [ex for ex in data if ex.response]
    if not data:
        raise ValueError(f"{ctx.stage}: no examples with a response to train on")
    tensors = []
    for chunk in batches(data, cfg.batch_size):
        b = sft_batch(tokenizer, [ex.prompt for ex in chunk], [ex.response for ex in chunk], cfg.max_length,
                      loss_on=loss_on, template=template)
        tensors.append(b.to(ctx.device))
    params = None
    if lora is not None:
        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(model, PeftModel):
            raise ValueError("attack.lora cannot be combined with a defence that already wraps the model in an adapter")
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)

    def loss_fn(m, batch):
        return m(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss

    stats = train_loop(model, tensors, cfg, ctx, loss_fn=loss_fn, params=params, desc=desc)
    ctx.stats["train"] = stats.summary()
    if lora is not None:
        model = model.merge_and_unload()
    return model
