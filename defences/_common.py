"""Helpers shared by the built-in defences: the data-reading config, example checks, batching.

Not a defence itself (nothing here is registered). Importing it loads no torch: a defence's
``Config`` validates (and bad input is refused) without it; the functions that build tensors or
train import it when they run.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

from pydantic import Field, field_validator

from harness.api.components import DatasetRef, Example, TrainConfig
from harness.api.errors import DataError
from harness.lib.text import (PROMPT_TEMPLATE, RESPONSE_SEPARATOR, LossOn, batches, paired_batch, prompt_token_lengths,
                               sft_batch)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PAPER_DATASET = DatasetRef(name="beavertails", split="30k_train")


class DataDefenceConfig(TrainConfig):
    """Training hyper-parameters of a defence that reads data (defaults: the RepNoise paper's
    defence stage: lr 2e-5, Adam, cosine, 10% warm-up, batch 8, 1 epoch, 256 tokens, 10k pairs of
    BeaverTails ``30k_train``). The drawn examples are shuffled (seeded) before batching unless
    ``shuffle: false`` (the authors' order). The training text is ``template`` with the question
    in ``{prompt}``, then ``separator``, then the answer (the paper's ``Question: ...\nAnswer:``;
    ``separator`` is ``""`` in the authors' code); a preset that attacks and evaluates with a chat
    template sets the same template here (``defence_defaults``)."""

    lr: float = Field(2e-5, gt=0)
    batch_size: int = Field(8, gt=0)
    samples: int = Field(10000, gt=0)
    dataset: DatasetRef = PAPER_DATASET
    shuffle: bool = True
    template: str = PROMPT_TEMPLATE
    separator: str = RESPONSE_SEPARATOR

    @field_validator("template")
    @classmethod
    def _template_has_the_question(cls, value: str) -> str:
        """A template the text builders can fill: ``{prompt}`` once or more, no other field."""
        try:
            value.format(prompt="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"holds a field other than {{prompt}} ({exc}); write {{{{ and }}}} for literal "
                             "braces") from None
        if "{prompt}" not in value:
            raise ValueError("must contain {prompt} (where the question goes)")
        return value


class SFTDefenceConfig(DataDefenceConfig):
    """A defence trained with a plain causal-LM loss on one text per example (gradient ascent,
    safety training, security vectors, Vaccine): ``loss_on: response`` counts the answer tokens,
    ``loss_on: all`` the whole text padded with EOS to ``max_length`` (labels = input ids, the
    authors' baselines)."""

    loss_on: LossOn = "response"


def require(data: Sequence[Example], fields: Iterable[str], defence: str) -> list[Example]:
    """The examples, checked to carry every field in ``fields`` (e.g. "response", "refusal")."""
    fields = tuple(fields)
    data = list(data)
    if not data:
        raise DataError(f"defence {defence}: got no examples to train on")
    for name in fields:
        missing = sum(1 for ex in data if not getattr(ex, name))
        if missing:
            raise DataError(f"defence {defence}: {missing} of {len(data)} examples have no {name!r}; this defence "
                            f"needs every example to carry {' and '.join(repr(f) for f in fields)}")
    return data


def shuffled(data: Sequence[Any], generator: torch.Generator) -> list[Any]:
    """``data`` in a seeded random order. (The authors' data loaders do not shuffle: they train in
    file order; ``training_order`` with ``shuffle: false`` does the same.)"""
    import torch

    order = torch.randperm(len(data), generator=generator).tolist()
    return [data[i] for i in order]


def training_order(data: Sequence[Any], cfg, ctx) -> list[Any]:
    """The examples in the order a defence trains on them: seeded shuffle when ``cfg.shuffle``,
    else as drawn."""
    return shuffled(data, ctx.generator(0)) if getattr(cfg, "shuffle", True) else list(data)


def model_device(model) -> torch.device:
    import torch

    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    import torch

    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def make_paired_batches(tokenizer, data: Sequence[Example], batch_size: int, max_length: int,
                        device: Optional[torch.device] = None, separator: str = RESPONSE_SEPARATOR,
                        template: str = PROMPT_TEMPLATE) -> list[tuple[dict, dict]]:
    """``(harmful, harmless)`` dicts per batch, as ``harness.lib.text.paired_batch`` builds them
    (right padding with pad = eos to one common length), plus ``prompt_lengths`` (tokens of the
    question formatted with ``template``, for the response-only masks of the corrected losses)."""
    import torch

    out = []
    for chunk in batches(list(data), batch_size):
        prompts = [ex.prompt for ex in chunk]
        harmful, harmless = paired_batch(tokenizer, prompts, [ex.response for ex in chunk],
                                         [ex.refusal for ex in chunk], max_length, separator=separator,
                                         template=template)
        if torch.equal(harmful["input_ids"], harmless["input_ids"]):
            # every pair identical after truncation (long questions, short max_length): no position
            # differs, every masked CE would be 0/0 = NaN. Skip the batch and say so.
            log.warning("paired batch of %d skipped: harmful and harmless texts are identical within "
                        "max_length=%d tokens (questions longer than the context?)", len(chunk), max_length)
            continue
        lengths = torch.tensor(prompt_token_lengths(tokenizer, prompts, template))
        harmful["prompt_lengths"] = lengths
        harmless["prompt_lengths"] = lengths.clone()
        if device is not None:
            harmful, harmless = to_device(harmful, device), to_device(harmless, device)
        out.append((harmful, harmless))
    if not out:
        raise DataError(f"no usable harmful/harmless pairs: every pair is identical within max_length={max_length} "
                        "tokens; raise defence.max_length")
    return out


def make_sft_batches(tokenizer, data: Sequence[Example], field: str, batch_size: int, max_length: int,
                     device: Optional[torch.device] = None, loss_on: LossOn = "response",
                     separator: str = RESPONSE_SEPARATOR, template: str = PROMPT_TEMPLATE) -> list:
    """Causal-LM batches of ``template(question) + separator + example.<field>``: the loss on the answer tokens
    (``loss_on="response"``), or, as the authors' baselines train, on the whole text padded with
    EOS to ``max_length`` (``loss_on="all"``; labels = input ids, see ``harness.lib.text.sft_batch``)."""
    out = []
    for chunk in batches(list(data), batch_size):
        b = sft_batch(tokenizer, [ex.prompt for ex in chunk], [getattr(ex, field) for ex in chunk], max_length,
                      loss_on=loss_on, template=template, separator=separator)
        out.append(b.to(device) if device is not None else b)
    return out


def lm_loss(model, batch) -> torch.Tensor:
    """Mean token cross-entropy of an ``SFTBatch`` (labels -100 ignored)."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                 use_cache=False).loss


def train_loop(model, batches, cfg, ctx, **kwargs):
    """``harness.lib.training.train_loop``, imported when a defence trains (it loads torch). The
    defences call it by this module-level name, so a test can replace it per defence module."""
    from harness.lib.training import train_loop as loop

    return loop(model, batches, cfg, ctx, **kwargs)
