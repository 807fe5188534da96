"""Additional safety training (a baseline of Rosati et al., NeurIPS 2024, "Representation
Noising"): ordinary supervised fine-tuning of the whole model on refusals to the harmful
questions.

Loss: L = CE(refusal tokens | "Question: {prompt}\\nAnswer:\\n"), the mean token cross-entropy on
the refusal (and its closing EOS) only; the question tokens carry no loss.

Defaults (the RepNoise defence stage, so the rows compare): lr 2e-5, Adam, cosine schedule with
10% warm-up, batch 8, 1 epoch, 256 tokens, 10k BeaverTails ``30k_train`` questions with refusals.
"""

from __future__ import annotations

from defences._common import DataDefenceConfig, lm_loss, make_sft_batches, model_device, require, shuffled
from harness.api.components import Defence
from harness.api.registry import DEFENCES
from harness.lib.training import train_loop


@DEFENCES.register("safety_training")
class SafetyTraining(Defence):
    """Additional safety training: fine-tune on refusals to the harmful questions."""

    class Config(DataDefenceConfig):
        pass

    def apply(self, model, tokenizer, data, ctx):
        cfg = self.config
        data = require(data, ("refusal",), "safety_training")
        batches = make_sft_batches(tokenizer, shuffled(data, ctx.generator(0)), "refusal", cfg.batch_size,
                                   cfg.max_length, device=model_device(model))
        stats = train_loop(model, batches, cfg, ctx, loss_fn=lm_loss, desc="safety_training")
        ctx.stats["train"] = stats.summary()
        return model
