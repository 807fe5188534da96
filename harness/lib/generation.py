"""Batched greedy generation with left padding (the paper's evaluation decoding).

Prompts are sorted by token count so each batch pads little, generated ``batch_size`` at a time with
``do_sample=False`` and the KV cache, and returned in the input order. Only the new tokens are
decoded, each row up to its first EOS: Hugging Face ``generate`` stops a finished row (it writes
padding after its EOS) and the whole batch once every row has finished, and the decoding here
cuts at the EOS so a pad token that is not a special token never shows up as text.

Batch size: on CPU the configured one. On CUDA it is chosen from the free GPU memory and the
model's KV-cache bytes per row (``choose_batch_size``), capped at ``AUTO_BATCH_CAP`` and the
number of prompts; the size used is reported through ``stats`` (the evaluation records it next
to ``max_new_tokens``).

Each prompt starts with the tokenizer's default BOS token, as the authors' evaluation tokenises
it (``harness.lib.text.encode``), and never with two: a prompt whose text already begins with the
BOS token (a chat template that writes it) gets none added. ``add_special_tokens=False`` turns
the BOS off.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from harness.lib.text import encode, ensure_pad_token

log = logging.getLogger(__name__)

AUTO_BATCH_CAP = 128  # most rows per batch on CUDA, however much memory is free
FREE_FRACTION = 0.5  # share of the free GPU memory the KV cache and logits may take; the rest is
#                      left for the prefill's activations and the allocator's fragmentation


def kv_bytes_per_token(model) -> Optional[int]:
    """Bytes of KV cache one token of one row takes: layers x 2 (K and V) x KV heads x head dim x
    bytes of the model's dtype. None when the config does not say (then the configured batch size
    is used)."""
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    try:
        layers = int(cfg.num_hidden_layers)
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None
    dtype_bytes = next(model.parameters()).element_size()
    return layers * 2 * kv_heads * head_dim * dtype_bytes


def choose_batch_size(model, configured: int, *, prompt_tokens: int, new_tokens: int, n_prompts: int,
                      free_bytes: Optional[int] = None, device: Optional[torch.device] = None,
                      cap: int = AUTO_BATCH_CAP) -> int:
    """Rows per generate call. CPU (or any non-CUDA device): ``configured``. CUDA: as many rows as
    ``FREE_FRACTION`` of the free memory holds, a row costing its KV cache over ``prompt_tokens +
    new_tokens`` tokens plus two float32 rows of logits, at least 1 and at most ``cap`` and
    ``n_prompts``. ``free_bytes`` overrides the measured free memory (tests)."""
    device = device if device is not None else next(model.parameters()).device
    if device.type != "cuda":
        return configured
    per_token = kv_bytes_per_token(model)
    if per_token is None:
        log.debug("generation: the model config gives no KV-cache shape; batch size %d as configured", configured)
        return configured
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    per_row = per_token * (prompt_tokens + new_tokens) + 2 * 4 * vocab
    rows = int(free_bytes * FREE_FRACTION) // max(per_row, 1)
    return max(1, min(cap, max(n_prompts, 1), rows))


def _new_tokens(row: torch.Tensor, eos_id: Optional[int]) -> tuple[torch.Tensor, bool]:
    """The generated ids of one row up to (not including) its first EOS, and whether it had one."""
    if eos_id is not None:
        hits = (row == eos_id).nonzero()
        if len(hits):
            return row[: int(hits[0, 0])], True
    return row, False


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 100, batch_size: int = 16,
             progress: bool = True, desc: str = "generate", max_prompt_tokens: int = 512,
             add_special_tokens: bool = True, stats: Optional[dict] = None) -> list[str]:
    """Greedy continuations of ``prompts`` (input order). ``batch_size`` is the configured rows per
    call (used as is on CPU; see ``choose_batch_size``). ``stats``, when given, is filled with
    ``batch_size`` (the one used), ``rows``, ``new_tokens`` (generated tokens counted per row up to
    and including its EOS) and ``calls`` (generate calls)."""
    ensure_pad_token(tokenizer)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos_id = tokenizer.eos_token_id
    ids = [_ids(tokenizer, p, add_special_tokens, max_prompt_tokens) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))  # by token count: batches pad little
    batch = choose_batch_size(model, batch_size, prompt_tokens=max((len(x) for x in ids), default=0),
                              new_tokens=max_new_tokens, n_prompts=len(prompts), device=device)
    out: list[str] = [""] * len(prompts)
    counted = calls = 0
    try:
        for start in tqdm(range(0, len(order), batch), desc=desc, disable=not progress, leave=False):
            idx = order[start : start + batch]
            enc = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, padding=True, return_tensors="pt").to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_id,
                                 temperature=None, top_p=None, top_k=None)
            calls += 1
            new = gen[:, enc["input_ids"].shape[1]:]
            for j, i in enumerate(idx):
                kept, ended = _new_tokens(new[j], eos_id)
                counted += len(kept) + ended
                out[i] = tokenizer.decode(kept, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    if stats is not None:
        stats.update(batch_size=batch, rows=len(prompts), new_tokens=counted, calls=calls)
    return out


@torch.no_grad()
def generate_one_by_one(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 100,
                        progress: bool = True, stats: Optional[dict] = None) -> list[str]:
    """Reference path for the batching benchmark: a plain ``model.generate`` per prompt, no padding.
    ``stats`` as in ``generate`` (``batch_size`` 1)."""
    ensure_pad_token(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos_id = tokenizer.eos_token_id
    out = []
    counted = 0
    for prompt in tqdm(prompts, desc="generate (1 by 1)", disable=not progress, leave=False):
        enc = {"input_ids": torch.tensor([_ids(tokenizer, prompt, True, None)], device=device)}
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_id,
                             temperature=None, top_p=None, top_k=None)
        kept, ended = _new_tokens(gen[0, enc["input_ids"].shape[1]:], eos_id)
        counted += len(kept) + ended
        out.append(tokenizer.decode(kept, skip_special_tokens=True))
    model.train(was_training)
    if stats is not None:
        stats.update(batch_size=1, rows=len(prompts), new_tokens=counted, calls=len(prompts))
    return out


def _ids(tokenizer, text: str, add_special_tokens: bool, max_length) -> list[int]:
    """The prompt's ids: BOS per the tokenizer's default (once) unless ``add_special_tokens`` is
    False; cut at ``max_length`` from the right."""
    if add_special_tokens:
        return encode(tokenizer, text, max_length)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:max_length] if max_length is not None else ids
