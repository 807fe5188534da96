"""Additional safety training (a baseline of Rosati et al., NeurIPS 2024, "Representation
Noising"): ordinary supervised fine-tuning of the whole model on refusals to the harmful
questions.

Loss: L = CE(refusal tokens | "Question: {prompt}\\nAnswer:\\n"), the mean token cross-entropy on
the refusal (and its closing EOS) only; the question tokens carry no loss (``loss_on: response``).
``loss_on: all`` is the authors' ``min_harmless_loss``: labels = the input ids of the whole
harmless text padded with EOS to ``max_length`` (see docs/fidelity.md).

Defaults (the RepNoise defence stage, so the rows compare): lr 2e-5, Adam, cosine schedule with
10% warm-up, batch 8, 1 epoch, 256 tokens, 10k BeaverTails ``30k_train`` questions with refusals.
"""

from __future__ import annotations

from defences._common import (SFTDefenceConfig, lm_loss, make_sft_batches, model_device, require, train_loop,
                              training_order)
from harness.api.components import Defence
from harness.api.registry import DEFENCES


@DEFENCES.register("safety_training")
class SafetyTraining(Defence):
    """Additional safety training: fine-tune on refusals to the harmful questions."""

    cost_factor = 1.0  # plain fine-tuning

    class Config(SFTDefenceConfig):
        pass

    def apply(self, model, tokenizer, data, ctx):
        cfg = self.config
        data = require(data, ("refusal",), "safety_training")
        batches = make_sft_batches(tokenizer, training_order(data, cfg, ctx), "refusal", cfg.batch_size,
                                   cfg.max_length, device=model_device(model), loss_on=cfg.loss_on,
                                   separator=cfg.separator, template=cfg.template)
        train_loop(model, batches, cfg, ctx, loss_fn=lm_loss, desc="safety_training")
        return model
