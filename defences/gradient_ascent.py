"""Gradient ascent (a baseline of Rosati et al., NeurIPS 2024, "Representation Noising"):
maximise the language-modelling loss on the harmful answers, optionally while keeping the loss on
refusals low.

Loss: L = -CE(harmful answer | question) + retain_weight * CE(refusal | question), token-mean
cross-entropies on the answer tokens only (``loss_on: response``), or, as the authors' code
(``max_harmful_loss``), on the whole text padded with EOS to ``max_length``, labels = input ids
(``loss_on: all``; see docs/fidelity.md).

Defaults: retain_weight 0 (pure ascent), lr 2e-5, Adam, cosine schedule with 10% warm-up,
batch 8, 1 epoch, 256 tokens, 10k BeaverTails ``30k_train`` pairs (the RepNoise defence stage).
"""

from __future__ import annotations

from pydantic import Field

from defences._common import (SFTDefenceConfig, lm_loss, make_sft_batches, model_device, require, train_loop,
                              training_order)
from harness.api.components import Defence
from harness.api.registry import DEFENCES


@DEFENCES.register("gradient_ascent")
class GradientAscent(Defence):
    """Gradient ascent on the harmful answers (optionally with a retain loss on refusals)."""

    cost_factor = 1.0  # one pass on the harmful answers per step

    @classmethod
    def training_cost(cls, config) -> float:
        return 2.0 * cls.cost_factor if config.retain_weight > 0 else cls.cost_factor  # + a pass on the refusals

    class Config(SFTDefenceConfig):
        retain_weight: float = Field(0.0, ge=0)

    def apply(self, model, tokenizer, data, ctx):
        cfg = self.config
        retain = cfg.retain_weight > 0
        data = require(data, ("response", "refusal") if retain else ("response",), "gradient_ascent")
        data = training_order(data, cfg, ctx)
        device = model_device(model)
        text = dict(device=device, loss_on=cfg.loss_on, separator=cfg.separator, template=cfg.template)
        harmful = make_sft_batches(tokenizer, data, "response", cfg.batch_size, cfg.max_length, **text)
        refusals = (make_sft_batches(tokenizer, data, "refusal", cfg.batch_size, cfg.max_length, **text)
                    if retain else [None] * len(harmful))

        def loss_fn(m, batch):
            harm, refusal = batch
            harmful_ce = lm_loss(m, harm)
            out = {"harmful_ce": harmful_ce}
            loss = -harmful_ce
            if refusal is not None:
                out["retain_ce"] = lm_loss(m, refusal)
                loss = loss + cfg.retain_weight * out["retain_ce"]
            out["loss"] = loss
            return out

        train_loop(model, list(zip(harmful, refusals)), cfg, ctx, loss_fn=loss_fn, desc="gradient_ascent")
        return model
