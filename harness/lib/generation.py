"""Batched greedy generation with left padding (the paper's evaluation decoding).

Prompts are sorted by length so each batch pads little, generated ``batch_size`` at a time with
``do_sample=False``, and returned in the input order. Only the new tokens are decoded.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from harness.lib.text import ensure_pad_token


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 100, batch_size: int = 16,
             progress: bool = True, desc: str = "generate", max_prompt_tokens: int = 512,
             add_special_tokens: bool = False) -> list[str]:
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
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_prompt_tokens, add_special_tokens=add_special_tokens).to(device)
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
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             temperature=None, top_p=None, top_k=None)
        out.append(tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out
