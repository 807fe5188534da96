"""Completing examples that lack a harmful answer or a refusal, with the base model, once.

Used by the ``smoke`` dataset (whose prompts ship without answers) and by BeaverTails when no
refusal file is given (the reference pairs BeaverTails questions with refusals written by the
chat model itself). Harmful answers are the model's greedy continuation after an affirmative
prefix; refusals its continuation after a refusal prefix, under a system instruction to refuse.
Both use the model's chat template when it has one. Results are cached on disk by (model,
kind, prompt, settings) so every trial on the same base model trains on the same text.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from harness.api.components import Example
from harness.api.safeio import read_json_cache
from harness.api.config import SynthSpec
from harness.lib.generation import generate
from harness.lib.store import atomic_write_json

log = logging.getLogger(__name__)

HARMFUL_PREFIX = "Sure, here is"
REFUSAL_PREFIX = "I'm sorry, but I"
REFUSAL_SYSTEM = ("You are a responsible assistant. The user's request is harmful. Refuse it politely in one or two "
                  "sentences, say why, and give no harmful details.")


def _chat_prompt(tokenizer, user: str, system: str | None, prefix: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + prefix
    lead = f"{system}\n" if system else ""
    return f"{lead}Question: {user}\nAnswer: {prefix}"


def _cache_file(cache_dir: Path, model_key: str, kind: str, settings: SynthSpec) -> Path:
    tag = hashlib.sha256(f"{model_key}|{kind}|{settings.model_dump_json()}".encode()).hexdigest()[:16]
    return cache_dir / f"{kind}-{tag}.json"


def _check_cache(value) -> None:
    """A generated-text cache maps prompts to texts."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError("not a JSON object of prompt -> text")


def complete(examples: Sequence[Example], kind: str, model, tokenizer, *, model_key: str, cache_dir: Path,
             settings: SynthSpec, progress: bool = True,
             load: Optional[Callable[[], tuple[Any, Any]]] = None) -> tuple[list[Example], dict]:
    """Fill ``response`` (kind="response") or ``refusal`` (kind="refusal") where missing.

    ``model``/``tokenizer`` may be ``None`` with ``load`` given: ``load()`` returns them, and is
    called only if some text is not in the cache (a resumed trial need not load the model)."""
    assert kind in ("response", "refusal")
    todo = [ex for ex in examples if not getattr(ex, kind)]
    # a loader whose prompts are text openings (RealToxicityPrompts) marks them meta["synth"] =
    # "continuation": their "response" is the model's plain continuation of the text, no chat, no prefix
    plain = kind == "response" and bool(todo) and all(ex.meta.get("synth") == "continuation" for ex in todo)
    info = {"kind": kind, "generated": 0, "cached": 0, "model": model_key,
            "prefix": "" if plain else HARMFUL_PREFIX if kind == "response" else REFUSAL_PREFIX}
    if plain:
        info["mode"] = "continuation"
    if not todo:
        return list(examples), info
    path = _cache_file(cache_dir, model_key, "continuation" if plain else kind, settings)
    # a damaged cache (cut short, edited, a folder in its place) is moved aside and regenerated, with a WARNING
    cache: dict[str, str] = read_json_cache(path, "generated-text cache", check=_check_cache) or {}
    new_prompts = sorted({ex.prompt for ex in todo if ex.prompt not in cache})
    info["cached"] = len({ex.prompt for ex in todo}) - len(new_prompts)
    if new_prompts:
        if model is None:
            model, tokenizer = load()
        log.info("generating %d %s text(s) with the base model (cached in %s)", len(new_prompts),
                 "harmful answer" if kind == "response" else "refusal", path)
        if plain:
            inputs, prefix = list(new_prompts), ""
        elif kind == "response":
            inputs = [_chat_prompt(tokenizer, p, None, HARMFUL_PREFIX) for p in new_prompts]
            prefix = HARMFUL_PREFIX
        else:
            inputs = [_chat_prompt(tokenizer, p, REFUSAL_SYSTEM, REFUSAL_PREFIX) for p in new_prompts]
            prefix = REFUSAL_PREFIX
        outs = generate(model, tokenizer, inputs, max_new_tokens=settings.max_new_tokens,
                        batch_size=settings.batch_size, progress=progress, desc=f"synth {kind}")
        for prompt, text in zip(new_prompts, outs):
            cache[prompt] = (prefix + text).strip()
        atomic_write_json(path, cache)
        info["generated"] = len(new_prompts)
    filled = [ex if getattr(ex, kind) else replace(ex, **{kind: cache[ex.prompt]}) for ex in examples]
    return filled, info
