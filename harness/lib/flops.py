"""Matrix-multiply FLOP counts of decoder-only transformer training steps, from a model's shape.

Counted: every matrix multiply of the forward pass (2 FLOPs per multiply-add) — the q/k/v/o
projections, the two attention products (scores and weighted values, dense ``seq x seq`` per head
as dense kernels compute them; causality not discounted), the MLP matrices (3 for a gated MLP as
in Llama, 2 otherwise) and the LM head at the positions whose logits a loss uses. Backward = 2 x
forward (a gradient for the input and one for the weight of every multiply), so a training step
is 3 x forward. Not counted: element-wise work (norms, activations, softmax, the optimiser),
which is what ``torch.utils.flop_counter.FlopCounterMode`` leaves out too; ``tests/test_flops.py``
checks these counts against it on a tiny Llama.

Two training steps, on one batch of ``batch`` rows x ``seq`` tokens:

* plain fine-tuning: one body pass, the head at the ``counted`` label positions;
* RepNoise (``defences/repnoise.py``): a harmful and a harmless body pass; the head at the harmful
  counted positions for the final CE and for the logit lens of each of the ``layers + 1``
  hidden states, and at the harmless counted positions for the retain CE; plus the MMD's Gram
  matrix of ``2 * batch`` rows x ``seq * hidden`` features per layer (tiny next to the rest).

The ratio of the two is the floor of a RepNoise step's cost relative to plain fine-tuning: no
implementation of the exact loss does less matrix work. Pure Python; no torch import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

# model_type values whose MLP is up -> activation -> down (2 matrices); the rest are gated (3)
UNGATED = frozenset({"gpt2", "gpt_neo", "gptj", "gpt_neox", "opt", "phi", "falcon", "bloom"})


@dataclass(frozen=True)
class Shape:
    """What the FLOP count needs of a model's config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    mlp_matrices: int = 3

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def as_dict(self) -> dict:
        return asdict(self)


def _field(cfg: Mapping[str, Any], names: tuple[str, ...], default: Optional[int] = None) -> int:
    for name in names:
        value = cfg.get(name)
        if value is not None:
            return int(value)
    if default is not None:
        return default
    raise ValueError(f"model config has none of {', '.join(names)}: cannot count FLOPs from its shape")


def shape_of(config) -> Shape:
    """The :class:`Shape` of a Hugging Face config object or a ``config.json`` mapping
    (Llama/Mistral/Qwen2 names, GPT-2 names as a fallback)."""
    cfg = config if isinstance(config, Mapping) else config.to_dict()
    hidden = _field(cfg, ("hidden_size", "n_embd", "d_model"))
    heads = _field(cfg, ("num_attention_heads", "n_head"))
    model_type = str(cfg.get("model_type", ""))
    return Shape(hidden=hidden,
                 intermediate=_field(cfg, ("intermediate_size", "n_inner", "ffn_dim"), default=4 * hidden),
                 layers=_field(cfg, ("num_hidden_layers", "n_layer")),
                 heads=heads,
                 kv_heads=_field(cfg, ("num_key_value_heads",), default=heads),
                 head_dim=_field(cfg, ("head_dim",), default=hidden // heads),
                 vocab=_field(cfg, ("vocab_size",)),
                 mlp_matrices=2 if model_type in UNGATED else 3)


def body_forward(shape: Shape, batch: int, seq: int) -> int:
    """Forward FLOPs of the decoder layers (embedding lookup and final norm are not multiplies)."""
    tokens = batch * seq
    projections = 2 * tokens * shape.hidden * (2 * shape.q_width + 2 * shape.kv_width)
    attention = 2 * 2 * batch * shape.heads * seq * seq * shape.head_dim
    mlp = 2 * tokens * shape.hidden * shape.intermediate * shape.mlp_matrices
    return shape.layers * (projections + attention + mlp)


def head_forward(shape: Shape, positions: int) -> int:
    """Forward FLOPs of the LM head at ``positions`` positions."""
    return 2 * positions * shape.hidden * shape.vocab


def mmd_forward(shape: Shape, batch: int, seq: int) -> int:
    """Forward FLOPs of RepNoise's MMD Gram matrices: per layer, ``2 * batch`` rows of
    ``seq * hidden`` features multiplied by their transpose."""
    rows = 2 * batch
    return shape.layers * 2 * rows * rows * seq * shape.hidden


def step(forward: int) -> int:
    """A training step's FLOPs from its forward FLOPs (backward = 2 x forward)."""
    return 3 * forward


@dataclass(frozen=True)
class StepCount:
    """Training-step FLOPs (forward + backward) of one batch, split by where they go."""

    body: int
    head: int
    other: int = 0

    @property
    def total(self) -> int:
        return self.body + self.head + self.other

    def as_dict(self) -> dict:
        return {"body": self.body, "head": self.head, "other": self.other, "total": self.total}


def plain_finetune(shape: Shape, batch: int, seq: int, counted: int) -> StepCount:
    """One fine-tuning step: one body pass and the head at the ``counted`` label positions."""
    return StepCount(body=step(body_forward(shape, batch, seq)), head=step(head_forward(shape, counted)))


def repnoise(shape: Shape, batch: int, seq: int, harmful_counted: int, harmless_counted: int) -> StepCount:
    """One RepNoise step (see the module docstring): two body passes; the head at the harmful
    counted positions ``layers + 2`` times (final CE and a lens per hidden state, embeddings
    included) and at the harmless counted positions once; the MMD Gram matrices in ``other``."""
    head_positions = harmful_counted * (shape.layers + 2) + harmless_counted
    return StepCount(body=step(2 * body_forward(shape, batch, seq)), head=step(head_forward(shape, head_positions)),
                     other=step(mmd_forward(shape, batch, seq)))


def repnoise_floor(shape: Shape, batch: int, seq: int, harmful_counted: int, harmless_counted: int,
                   plain_counted: int) -> dict:
    """The RepNoise step's FLOPs, plain fine-tuning's, and their ratio (the floor)."""
    rn = repnoise(shape, batch, seq, harmful_counted, harmless_counted)
    plain = plain_finetune(shape, batch, seq, plain_counted)
    return {"shape": shape.as_dict(), "batch": batch, "seq": seq, "harmful_counted": harmful_counted,
            "harmless_counted": harmless_counted, "plain_counted": plain_counted,
            "repnoise_flops": rn.as_dict(), "plain_flops": plain.as_dict(), "floor_ratio": rn.total / plain.total}
