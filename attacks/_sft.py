"""Supervised fine-tuning shared by the SFT attacks (harmfulqa, benign, toxicity, lora).

Importing this module (to validate an attack's ``Config``) loads neither torch nor peft: they are
imported by the functions that train.

Against a defence that hands the attack a PEFT model (``security_vectors``: its adapter active and
frozen), a LoRA attack adds an adapter of its own next to the defence's (``ATTACK_ADAPTER``), both
active during training, only the attack's trainable; afterwards the attack's update is merged into
the base weights and its adapter removed, so the defence's adapter and the model's other trainable
flags are as the defence left them (``prepare_eval`` switches the defence's adapter off, and the
evaluation scores the attacked base weights).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from harness.api.components import Attack, DatasetRef, Example, TrainConfig
from harness.api.space import searchable
from harness.lib.text import PROMPT_TEMPLATE, RESPONSE_SEPARATOR, batches, sft_batch

if TYPE_CHECKING:
    from harness.lib.context import StageContext

#: the attack's own adapter when the model already carries one (a PEFT model from the defence)
ATTACK_ADAPTER = "attack"


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


class QAAttackConfig(SFTAttackConfig):
    """An SFT attack on question/answer pairs in the paper's text format (``template`` +
    ``separator`` + answer), trained on BeaverTails ``30k_train`` and scored on ``30k_test`` unless
    an attack or preset names other data."""

    dataset: DatasetRef = DatasetRef(name="beavertails", split="30k_train")
    eval_dataset: DatasetRef = DatasetRef(name="beavertails", split="30k_test")
    template: str = PROMPT_TEMPLATE
    separator: str = RESPONSE_SEPARATOR


class SFTAttack(Attack):
    """Base of the supervised fine-tuning attacks (not registered itself): ``run`` fine-tunes on
    the attack rows with the config's ``loss_on``, ``template``, ``separator`` and LoRA adapter
    (``lora_spec``), logging as ``attack <registered name>``."""

    def lora_spec(self) -> Optional[LoraSpec]:
        return self.config.lora

    def run(self, model, tokenizer, data, ctx):
        c = self.config
        return sft_attack(model, tokenizer, data, c, ctx, loss_on=c.loss_on, template=c.template, lora=self.lora_spec(),
                          desc=f"attack {self.registry_name}", separator=c.separator)


def _lora_layers(model, adapter: str) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def add_attack_adapter(model, lora: LoraSpec):
    """``(model, params, restore)``: ``model`` with a trainable LoRA adapter, the adapter's
    parameters, and the ``requires_grad`` flags to put back once it is merged (``None`` when the
    model was an ordinary one: everything trainable again is what ``merge_and_unload`` leaves)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    if not isinstance(model, PeftModel):
        model = get_peft_model(model, config)
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        return model, params, None
    if ATTACK_ADAPTER in model.peft_config:
        raise ValueError(f"the model already carries an adapter named {ATTACK_ADAPTER!r}")
    restore = {n: p.requires_grad for n, p in model.named_parameters()}
    active = list(model.base_model.active_adapters)
    model.add_adapter(ATTACK_ADAPTER, config)
    # the defence's adapter(s) stay active (the attack trains through them), the new one joins
    model.base_model.set_adapter(active + [ATTACK_ADAPTER])
    params = [p for m in _lora_layers(model, ATTACK_ADAPTER) for p in
              (*m.lora_A[ATTACK_ADAPTER].parameters(), *m.lora_B[ATTACK_ADAPTER].parameters())]
    if not params:
        raise ValueError(f"attack LoRA: peft placed no adapter on the model (target_modules={lora.target_modules})")
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    return model, params, (restore, active)


def merge_attack_adapter(model, restore):
    """The attack's update ``(alpha / r) B A`` added to the base weights, its adapter removed."""
    if restore is None:
        return model.merge_and_unload()
    import torch

    flags, active = restore
    with torch.no_grad():
        for layer in _lora_layers(model, ATTACK_ADAPTER):
            weight = layer.get_base_layer().weight
            weight.add_(layer.get_delta_weight(ATTACK_ADAPTER).to(weight.dtype))
    model.delete_adapter(ATTACK_ADAPTER)
    model.base_model.set_adapter(active)
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, False))
    return model


def sft_attack(model, tokenizer, data: list[Example], cfg, ctx: "StageContext", *, loss_on: str,
               template: str = PROMPT_TEMPLATE, lora: Optional[LoraSpec] = None, desc: str = "attack",
               separator: str = RESPONSE_SEPARATOR):
    """Fine-tune on (prompt, response) pairs in the drawn order (seeded shuffle first when
    ``cfg.shuffle``); returns the attacked model. ``loss_on="all"`` is the authors' loss: labels =
    the input ids of the text padded with EOS to ``cfg.max_length`` (``harness.lib.text.sft_batch``).
    With ``lora``, only an adapter trains and is merged into the weights afterwards (next to a
    defence's adapter when the model carries one: the module docstring)."""
    import torch

    from harness.lib.training import train_loop

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
    params = restore = None
    if lora is not None:
        model, params, restore = add_attack_adapter(model, lora)

    def loss_fn(m, batch):
        return m(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss

    train_loop(model, tensors, cfg, ctx, loss_fn=loss_fn, params=params, desc=desc)
    if lora is not None:
        model = merge_attack_adapter(model, restore)
    return model
