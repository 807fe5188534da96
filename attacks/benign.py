"""Benign fine-tuning attack: fine-tuning on harmless instruction data erodes safety.

Paper: Qi et al. 2023, "Fine-tuning Aligned Language Models Compromises Safety, Even When Users
Do Not Intend To!" (ICLR 2024), section 4.4: fine-tuning Llama-2-7b-Chat or GPT-3.5 on purely
benign instruction data (Alpaca, Dolly) raises the harmfulness rate on harmful instructions,
although no harmful example is ever seen. The attacker here is the "benign user" of that
section: the same supervised fine-tuning as harmfulqa,

    L(theta) = - sum_t log p_theta(y_t | x, y_<t)        over (instruction x, reference answer y)

on benign pairs, and the model is then scored on the harmful evaluation prompts (harmfulness).

Data: dataset ``instructions`` (hub ``tatsu-lab/alpaca`` by default, or any local
JSON/JSONL/CSV copy through ``path``, or any hub instruction set with a field mapping); the
offline ``smoke`` preset uses ``lm_eval_cot`` (benign worked QA pairs shipped in the lm-eval
wheel), whose answers come with the rows, so nothing is generated. The evaluation prompts are the
harmful ones (BeaverTails ``30k_test``; the smoke prompts in the smoke preset).

Defaults: 1000 pairs, 1 epoch (Qi et al. fine-tune one epoch), lr 2e-5, batch 4, Adam, cosine,
10% warm-up, loss on the answer tokens; LoRA optional (``lora: {r: 8, alpha: 16}``). The search
space is the SFT attack's (``attacks._sft.SFTAttackConfig``; fields and training shared with harmfulqa
through ``attacks._sft.QAAttackConfig`` and ``SFTAttack``) with lr log-uniform [1e-6, 1e-4].
"""

from __future__ import annotations

from harness.api.components import DatasetRef
from harness.api.registry import ATTACKS
from harness.api.space import searchable

from attacks._sft import QAAttackConfig, SFTAttack


@ATTACKS.register("benign")
class BenignFineTuning(SFTAttack):
    """Fine-tuning on benign instruction data (Qi et al. 2023), scored on harmful prompts."""

    evaluation = "harmfulness"

    class Config(QAAttackConfig):
        lr: float = searchable(2e-5, {"log": [1e-6, 1e-4]}, gt=0)
        dataset: DatasetRef = DatasetRef(name="instructions")
