"""Harmful fine-tuning attack on harmful question/answer pairs (the paper's main attack).

Full-parameter supervised fine-tuning of the (defended) model on ``samples`` harmful QA pairs,
``"Question: {prompt}\\nAnswer:" + separator + response`` (separator ``"\\n"``; the authors join with
nothing: ``separator: ""`` in the ``paper`` preset), minimising the causal-LM cross-entropy

    L(theta) = - sum_t log p_theta(y_t | y_<t)

Paper settings (Rosati et al. 2024, docs/design.md): 1k or 10k BeaverTails pairs (the paper calls
them disjoint from the defence pairs; the authors' code takes both from the start of one file, so
they overlap: docs/fidelity.md), lr in {3e-5, 6e-5, 8e-5}, batch 4, 1 epoch, Adam, cosine schedule, 10% warm-up.
``loss_on: response`` (default) trains on the answer tokens only; ``loss_on: all`` reproduces the
original code exactly: labels = the input ids of the text padded with EOS to ``max_length``, so
the mean runs over ``max_length - 1`` positions per row (docs/fidelity.md). Optional LoRA
(``lora: {r: 8, alpha: 16}``) for parameter-efficient attacks. bf16 autocast on CUDA.
Scored with the harmfulness evaluation on ``eval_dataset`` (BeaverTails ``30k_test``).
"""

from __future__ import annotations

from harness.api.registry import ATTACKS

from attacks._sft import QAAttackConfig, SFTAttack


@ATTACKS.register("harmfulqa")
class HarmfulQA(SFTAttack):
    """Harmful fine-tuning on harmful QA pairs (BeaverTails by default), full-parameter or LoRA."""

    evaluation = "harmfulness"

    class Config(QAAttackConfig):  # the shared QA attack fields and defaults (attacks._sft)
        pass
