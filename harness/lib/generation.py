"""Batched greedy generation with left padding (the paper's evaluation decoding).

Prompts are sorted by length so each batch pads little, generated ``batch_size`` at a time with
``do_sample=False``, and returned in the input order. Only the new tokens are decoded.

Each prompt starts with the tokenizer's default BOS token, as the authors' evaluation tokenises
it (``harness.lib.text.encode``), and never with two: a prompt whose text already begins with the
BOS token (a chat template that writes it) gets none added. ``add_special_tokens=False`` turns
the BOS off.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from harness.lib.text import encode, ensure_pad_token


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 100, batch_size: int = 16,
             progress: bool = True, desc: str = "generate", max_prompt_tokens: int = 512,
             add_special_tokens: bool = True) -> list[str]:
    ensure_pad_token(tokenizer)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            enc = tokenizer.pad({"input_ids": [_ids(tokenizer, prompts[i], add_special_tokens, max_prompt_tokens)
                                               for i in idx]}, padding=True, return_tensors="pt").to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 temperature=None, top_p=None, top_k=None)
            new = gen[:, enc["input_ids"].shape[1]:]
            for j, i in enumerate(idx):
                out[i] = tokenizer.decode(new[j], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


@torch.no_grad()
def generate_one_by_one(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 100,
                        progress: bool = True) -> list[str]:
    """Reference path for the batching benchmark: one prompt at a time, no padding."""
    ensure_pad_token(tokenizer)
    device = next(model.parameters()).device
    model.eval()
    out = []
    for prompt in tqdm(prompts, desc="generate (1 by 1)", disable=not progress, leave=False):
        enc = {"input_ids": torch.tensor([_ids(tokenizer, prompt, True, None)], device=device)}
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             temperature=None, top_p=None, top_k=None)
        out.append(tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def _ids(tokenizer, text: str, add_special_tokens: bool, max_length) -> list[int]:
    """The prompt's ids: BOS per the tokenizer's default (once) unless ``add_special_tokens`` is
    False; cut at ``max_length`` from the right."""
    if add_special_tokens:
        return encode(tokenizer, text, max_length)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:max_length] if max_length is not None else ids
