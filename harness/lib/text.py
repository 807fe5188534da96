"""Prompt formats and tokenisation shared by defences, attacks and evaluation.

The paper's format (docs/design.md): harmful training text is ``"Question: {prompt}\\nAnswer:" +
separator + response`` and evaluation prompts are ``"Question: {prompt}\\nAnswer:"``. The
separator is ``"\\n"`` by default; the authors' code joins with nothing (``"Answer:{response}"``),
which the ``paper`` preset reproduces (``separator: ""``; see docs/fidelity.md).

Special tokens: every sequence gets the tokenizer's own default beginning-of-sequence token (the
authors call the tokenizer with its defaults, so Llama-2 sees ``<s>`` first in training and
evaluation), never a second one when the text already starts with it (a chat template that writes
``<s>`` itself), and no other special token: the end-of-sequence token is placed explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Sequence

if TYPE_CHECKING:  # torch is imported where tensors are built, so the constants import without it
    import torch

PROMPT_TEMPLATE = "Question: {prompt}\nAnswer:"
RESPONSE_SEPARATOR = "\n"
LossOn = Literal["response", "all"]


def format_prompt(prompt: str, template: str = PROMPT_TEMPLATE) -> str:
    return template.format(prompt=prompt)


def format_qa(prompt: str, response: str, template: str = PROMPT_TEMPLATE, separator: str = RESPONSE_SEPARATOR) -> str:
    """``format_prompt(prompt) + separator + response``, joined verbatim (a DecodingTrust
    continuation or an answer cut from an authors'-format refusal file keeps the whitespace it
    starts with, as the authors' texts do)."""
    return format_prompt(prompt, template) + separator + response


def ensure_pad_token(tokenizer) -> None:
    """The reference code pads with EOS; do the same when the tokenizer has no pad token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token first by default (Llama-2 does; GPT-2 and
    SmolLM2 do not). Cached on the tokenizer object."""
    cached = getattr(tokenizer, "_harness_adds_bos", None)
    if cached is not None:
        return cached
    bos = tokenizer.bos_token_id
    value = False
    if bos is not None:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        value = bool(with_special) and with_special[0] == bos and (not plain or plain[0] != bos)
    try:
        tokenizer._harness_adds_bos = value
    except AttributeError:  # pragma: no cover - a tokenizer that refuses new attributes
        pass
    return value


def bos_ids(tokenizer, text: str = "") -> list[int]:
    """``[bos_token_id]`` when the tokenizer adds BOS by default and ``text`` does not already
    start with the BOS token's text; ``[]`` otherwise (never two BOS)."""
    if not adds_bos(tokenizer):
        return []
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        return []
    return [tokenizer.bos_token_id]


def encode(tokenizer, text: str, max_length: Optional[int] = None) -> list[int]:
    """Token ids of ``text`` with the tokenizer's default BOS (once), cut at ``max_length`` from
    the right (the authors' ``truncation=True``)."""
    ids = bos_ids(tokenizer, text) + tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:max_length] if max_length is not None else ids


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
    loss_on: LossOn = "response",
    template: str = PROMPT_TEMPLATE,
    separator: str = RESPONSE_SEPARATOR,
) -> SFTBatch:
    """Right-padded causal-LM batch of ``format_qa(prompt, response)``.

    ``loss_on="response"`` (the corrected loss): the prompt and the response (+ a closing EOS) are
    tokenised separately, the labels are the response tokens and the EOS, the batch is padded to
    its longest row (labels -100), and a text longer than ``max_length`` loses prompt tokens from
    the left first (at least half the budget stays with the answer; the BOS stays first).

    ``loss_on="all"`` reproduces the authors' attack exactly: the whole text is tokenised at once
    (BOS per the tokenizer's default), cut at ``max_length`` from the right, padded with EOS to
    ``max_length`` (not to the batch's longest row) and the labels are the padded input ids, so
    the mean cross-entropy runs over ``max_length - 1`` positions per row, padding included.
    """
    import torch

    ensure_pad_token(tokenizer)
    eos = tokenizer.eos_token_id
    if loss_on == "all":
        rows = [encode(tokenizer, format_qa(p, r, template, separator), max_length)
                for p, r in zip(prompts, responses)]
        ids = torch.full((len(rows), max_length), eos, dtype=torch.long)
        mask = torch.zeros((len(rows), max_length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return SFTBatch(ids, mask, ids.clone())
    if loss_on != "response":
        raise ValueError(f"loss_on must be 'response' or 'all', got {loss_on!r}")
    rows, masks, labels = [], [], []
    for prompt, response in zip(prompts, responses):
        p_text = format_prompt(prompt, template)
        bos = bos_ids(tokenizer, p_text)
        p_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"]
        joined = format_qa(prompt, response, template, separator)[len(p_text):]
        resp = tokenizer(joined, add_special_tokens=False)["input_ids"] + [eos]
        budget = max_length - len(bos)
        if len(p_ids) + len(resp) > budget:
            # keep at least half the budget for the answer: cut the prompt from the left
            resp = resp[: max(budget // 2, budget - len(p_ids))]
            p_ids = p_ids[len(p_ids) - (budget - len(resp)):] if budget > len(resp) else []
        p_ids = bos + p_ids
        rows.append(p_ids + resp)
        labels.append([-100] * len(p_ids) + resp)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    for i, ids in enumerate(rows):
        n = len(ids)
        masks.append([1] * n + [0] * (width - n))
        labels[i] = labels[i] + [-100] * (width - n)
        rows[i] = ids + [pad] * (width - n)
    return SFTBatch(torch.tensor(rows), torch.tensor(masks), torch.tensor(labels))


def paired_batch(tokenizer, prompts: Sequence[str], harmful: Sequence[str], harmless: Sequence[str],
                 max_length: int, separator: str = RESPONSE_SEPARATOR,
                 template: str = PROMPT_TEMPLATE) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Harmful and harmless texts of the same questions, each cut at ``max_length`` tokens and
    right-padded with pad = eos to one common length (the longest row; the authors pad to
    ``max_length``, which changes no term of the RepNoise or adversarial loss: padded positions
    are equal in both texts, so the difference mask is 0 there)."""
    import torch

    ensure_pad_token(tokenizer)
    texts = [format_qa(p, r, template, separator) for p, r in zip(prompts, harmful)]
    texts += [format_qa(p, r, template, separator) for p, r in zip(prompts, harmless)]
    rows = [encode(tokenizer, t, max_length) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    n = len(prompts)
    return ({"input_ids": ids[:n], "attention_mask": mask[:n]},
            {"input_ids": ids[n:], "attention_mask": mask[n:]})


def prompt_token_lengths(tokenizer, prompts: Sequence[str], template: str = PROMPT_TEMPLATE) -> list[int]:
    """Number of tokens of ``format_prompt(p)``, BOS included (masks the prompts in the corrected
    losses)."""
    return [len(encode(tokenizer, format_prompt(p, template))) for p in prompts]


def batches(items: Sequence, batch_size: int):
    for i in range(0, len(items), batch_size):
        yield items[i : i + batch_size]
