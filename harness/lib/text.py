"""Prompt formats and tokenisation shared by defences, attacks and evaluation.

The paper's format (DESIGN.md): harmful training text is ``"Question: {prompt}\\nAnswer:\\n{response}"``
and evaluation prompts are ``"Question: {prompt}\\nAnswer:"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

PROMPT_TEMPLATE = "Question: {prompt}\nAnswer:"
RESPONSE_SEPARATOR = "\n"


def format_prompt(prompt: str, template: str = PROMPT_TEMPLATE) -> str:
    return template.format(prompt=prompt)


def format_qa(prompt: str, response: str, template: str = PROMPT_TEMPLATE) -> str:
    return format_prompt(prompt, template) + RESPONSE_SEPARATOR + response


def ensure_pad_token(tokenizer) -> None:
    """The reference code pads with EOS; do the same when the tokenizer has no pad token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


@dataclass
class SFTBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> "SFTBatch":
        return SFTBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}


def sft_batch(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
    loss_on: Literal["response", "all"] = "response",
    template: str = PROMPT_TEMPLATE,
) -> SFTBatch:
    """Right-padded causal-LM batch of ``format_qa(prompt, response) + eos``.

    ``loss_on="response"`` trains on the response tokens (and the closing EOS) only;
    ``loss_on="all"`` reproduces the reference attack, whose labels are the input ids, prompt
    and padding included.
    """
    ensure_pad_token(tokenizer)
    rows, masks, labels = [], [], []
    eos = tokenizer.eos_token_id
    for prompt, response in zip(prompts, responses):
        p_ids = tokenizer(format_prompt(prompt, template), add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(RESPONSE_SEPARATOR + response, add_special_tokens=False)["input_ids"]
        resp = r_ids + [eos]
        if len(p_ids) + len(resp) > max_length:
            # keep at least half the budget for the answer: cut the prompt from the left
            resp = resp[: max(max_length // 2, max_length - len(p_ids))]
            p_ids = p_ids[len(p_ids) - (max_length - len(resp)):] if max_length > len(resp) else []
        ids = p_ids + resp
        lab = [-100] * len(p_ids) + resp if loss_on == "response" else list(ids)
        rows.append(ids)
        labels.append(lab)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    for i, ids in enumerate(rows):
        n = len(ids)
        masks.append([1] * n + [0] * (width - n))
        if loss_on == "all":
            labels[i] = labels[i] + [pad] * (width - n)  # the reference: labels = padded input_ids
        else:
            labels[i] = labels[i] + [-100] * (width - n)
        rows[i] = ids + [pad] * (width - n)
    return SFTBatch(torch.tensor(rows), torch.tensor(masks), torch.tensor(labels))


def paired_batch(tokenizer, prompts: Sequence[str], harmful: Sequence[str], harmless: Sequence[str],
                 max_length: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Harmful and harmless texts of the same questions, right-padded with pad = eos to one
    common length (as the RepNoise reference does), truncated to ``max_length``."""
    ensure_pad_token(tokenizer)
    h_txt = [format_qa(p, r) for p, r in zip(prompts, harmful)]
    s_txt = [format_qa(p, r) for p, r in zip(prompts, harmless)]
    enc = tokenizer(h_txt + s_txt, add_special_tokens=False, truncation=True, max_length=max_length,
                    padding="longest", return_tensors="pt")
    n = len(h_txt)
    if tokenizer.padding_side == "left":  # always right-pad here
        enc = _repad_right(enc, tokenizer.pad_token_id)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    return ({"input_ids": ids[:n], "attention_mask": mask[:n]},
            {"input_ids": ids[n:], "attention_mask": mask[n:]})


def _repad_right(enc, pad_id):
    ids, mask = enc["input_ids"], enc["attention_mask"]
    out_ids = torch.full_like(ids, pad_id)
    out_mask = torch.zeros_like(mask)
    for i in range(ids.shape[0]):
        keep = mask[i].bool()
        n = int(keep.sum())
        out_ids[i, :n] = ids[i][keep]
        out_mask[i, :n] = 1
    return {"input_ids": out_ids, "attention_mask": out_mask}


def prompt_token_lengths(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Number of tokens of ``format_prompt(p)`` (used to mask prompts in corrected losses)."""
    return [len(tokenizer(format_prompt(p), add_special_tokens=False)["input_ids"]) for p in prompts]


def batches(items: Sequence, batch_size: int):
    for i in range(0, len(items), batch_size):
        yield items[i : i + batch_size]
