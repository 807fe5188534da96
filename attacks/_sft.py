"""Supervised fine-tuning shared by the harmful-QA and toxicity attacks."""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from harness.api.components import Example, TrainConfig
from harness.api.space import searchable
from harness.lib.text import PROMPT_TEMPLATE, RESPONSE_SEPARATOR, batches, sft_batch
from harness.lib.training import train_loop


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Optional[list[str]] = None  # None: peft's default for the architecture


#: the LoRA-vs-full axis of the attacker's search: full fine-tuning, or an adapter of rank 8 / 32
LORA_CHOICES = [None, {"r": 8, "alpha": 16}, {"r": 32, "alpha": 64}]


class SFTAttackConfig(TrainConfig):
    """What the supervised fine-tuning attacks share: the paper's attack lr 3e-5 (``TrainConfig``
    holds the rest: batch 4, 1 epoch, Adam, cosine, 10% warm-up, 256 tokens), the loss positions
    and an optional LoRA adapter.

    The attacker's search space (``harness search``; ``harness.api.space``) is declared here: lr
    log-uniform in [1e-5, 1e-3], samples in {250, 500, 1000, 2000, 10000} (a sweep file's ``search.space``
    narrows it to what a small dataset holds), 1-4 epochs, batch 2/4/8, Adam/AdamW/SGD, warm-up
    0-30%, ``loss_on`` response/all, full fine-tuning or LoRA rank 8/32."""

    lr: float = searchable(3e-5, {"log": [1e-5, 1e-3]}, gt=0)
    samples: int = searchable(1000, {"choice": [250, 500, 1000, 2000, 10000]}, gt=0)
    loss_on: Literal["response", "all"] = searchable("response", {"choice": ["response", "all"]})
    lora: Optional[LoraSpec] = searchable(None, {"choice": LORA_CHOICES})
    #: ranges of the fields inherited from TrainConfig (``harness.api.space``)
    search_ranges: ClassVar[dict] = {"epochs": {"int": [1, 4]}, "batch_size": {"choice": [2, 4, 8]},
                                     "optimizer": {"choice": ["adam", "adamw", "sgd"]},
                                     "warmup_ratio": {"uniform": [0.0, 0.3]}}


def sft_attack(model, tokenizer, data: list[Example], cfg, ctx, *, loss_on: str, template: str = PROMPT_TEMPLATE,
               lora: Optional[LoraSpec] = None, desc: str = "attack", separator: str = RESPONSE_SEPARATOR):
    """Fine-tune on (prompt, response) pairs in the drawn order (seeded shuffle first when
    ``cfg.shuffle``); returns the attacked model. ``loss_on="all"`` is the authors' loss: labels =
    the input ids of the text padded with EOS to ``cfg.max_length`` (``harness.lib.text.sft_batch``)."""
    data = [ex for ex in data if ex.response]
    if getattr(cfg, "shuffle", False):
        order = torch.randperm(len(data), generator=ctx.generator(0)).tolist()
        data = [data[i] for i in order]
    if not data:
        raise ValueError(f"{ctx.stage}: no examples with a response to train on")
    tensors = []
    for chunk in batches(data, cfg.batch_size):
        b = sft_batch(tokenizer, [ex.prompt for ex in chunk], [ex.response for ex in chunk], cfg.max_length,
                      loss_on=loss_on, template=template, separator=separator)
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

    train_loop(model, tensors, cfg, ctx, loss_fn=loss_fn, params=params, desc=desc)
    if lora is not None:
        model = model.merge_and_unload()
    return model
