"""Adversarial loss (a baseline of Rosati et al., NeurIPS 2024, "Representation Noising"):
RepNoise without the noise and the logit lens: learn the refusal, unlearn the harmful answer.

Loss: L = CE_M(harmless pass) - alpha * CE_M(harmful pass), where both cross-entropies count only
the tokens where the harmful and harmless texts of a pair differ (RepNoise's masked CE, same
``variant`` choice: "reference" reproduces the published masking, "corrected" uses the response
tokens; see ``defences.repnoise``).

Defaults: alpha 0.1, variant "reference", lr 2e-5, Adam, cosine schedule with 10% warm-up,
batch 8, 1 epoch, 256 tokens, 10k BeaverTails ``30k_train`` pairs (the RepNoise defence stage).
"""

from __future__ import annotations

from pydantic import Field

from defences._common import DataDefenceConfig, make_paired_batches, model_device, require, train_loop, training_order
from defences.repnoise import DEFAULT_VARIANT, Variant, difference_ce
from harness.api.components import Defence
from harness.api.registry import DEFENCES


@DEFENCES.register("adversarial_loss")
class AdversarialLoss(Defence):
    """Adversarial loss: harmless CE minus alpha times harmful CE on the tokens that differ."""

    cost_factor = 2.0  # a harmful and a harmless pass per step

    class Config(DataDefenceConfig):
        alpha: float = Field(0.1, ge=0)
        variant: Variant = DEFAULT_VARIANT

    def apply(self, model, tokenizer, data, ctx):
        cfg = self.config
        data = require(data, ("response", "refusal"), "adversarial_loss")
        pairs = make_paired_batches(tokenizer, training_order(data, cfg, ctx), cfg.batch_size, cfg.max_length,
                                    device=model_device(model), separator=cfg.separator, template=cfg.template)

        def loss_fn(m, batch):
            harmful_ce, harmless_ce = difference_ce(m, batch[0], batch[1], variant=cfg.variant)
            return {"loss": harmless_ce - cfg.alpha * harmful_ce, "harmful_ce": harmful_ce, "harmless_ce": harmless_ce}

        train_loop(model, pairs, cfg, ctx, loss_fn=loss_fn, desc="adversarial_loss")
        return model
