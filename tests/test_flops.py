"""harness.lib.flops: the matrix-multiply FLOP count of training steps, against a hand computation
and against what torch's FlopCounterMode measures on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from defences._common import make_paired_batches
from defences.repnoise import repnoise_backward
from harness.api.components import Example
from harness.lib import flops
from harness.lib.tiny import tiny_config, train_tokenizer

HAND = flops.Shape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10)


def test_counts_match_a_hand_computation():
    # one row of 3 tokens through HAND, multiply-adds x 2:
    #   q and o: 3 tokens x 8 x 8 each -> 2 * 192 = 384 each; k and v: 3 x 8 x 4 -> 192 each
    #   attention: 2 heads x (scores 3 x 3 x 4 + values 3 x 3 x 4) -> 2 * 2 * 72 = 288
    #   gated MLP: 3 matrices x 3 x 8 x 16 -> 3 * 768 = 2304
    per_layer = 384 + 384 + 192 + 192 + 288 + 2304
    assert flops.body_forward(HAND, batch=1, seq=3) == 2 * per_layer == 7488
    assert flops.head_forward(HAND, positions=3) == 2 * 3 * 8 * 10 == 480
    # MMD: 2 layers x Gram matrix of 2 rows x (3 * 8) features
    assert flops.mmd_forward(HAND, batch=1, seq=3) == 2 * 2 * 2 * 2 * 24
    plain = flops.plain_finetune(HAND, 1, 3, counted=2)
    assert plain.total == 3 * (7488 + 2 * 2 * 8 * 10)
    rn = flops.repnoise(HAND, 1, 3, harmful_counted=2, harmless_counted=1)
    # two body passes; head at 2 positions x (final + 3 hidden states) and 1 retain position
    assert rn.body == 3 * 2 * 7488 and rn.head == 3 * 2 * 8 * 10 * (2 * 4 + 1)
    floor = flops.repnoise_floor(HAND, 1, 3, 2, 1, 2)
    assert floor["floor_ratio"] == pytest.approx(rn.total / plain.total)


def test_shape_from_configs_and_missing_fields():
    cfg = tiny_config("llama", vocab_size=100, layers=3, hidden=32)
    s = flops.shape_of(cfg)
    assert (s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.head_dim, s.vocab, s.mlp_matrices) == \
        (32, 64, 3, 2, 1, 16, 100, 3)
    g = flops.shape_of(tiny_config("gpt2", vocab_size=100, layers=2, hidden=32))
    assert (g.intermediate, g.kv_heads, g.mlp_matrices) == (128, 2, 2)
    with pytest.raises(ValueError, match="vocab_size"):
        flops.shape_of({"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1})


def _tiny_llama(layers=2, hidden=32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tok = train_tokenizer()
    # eager attention: its products are plain matmuls FlopCounterMode sees (the CPU SDPA kernel is not counted)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok), layers, hidden), attn_implementation="eager")
    return model, tok


def _inplace_addmm(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _measured(fn, model) -> int:
    """Matmul FLOPs torch counts while ``fn`` runs, less the rotary-embedding frequency product
    (a (head_dim/2 x 1) @ (1 x seq) outer product that is not part of the model's shape). The
    counter knows ``addmm`` but not its in-place form (the fused CE accumulates the head's weight
    gradient with it), so that is added with the same formula."""
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _inplace_addmm})
    with counter:
        fn()
    rotary = [k for k in counter.get_flop_counts() if k.endswith("rotary_emb")]
    return counter.get_total_flops() - sum(sum(counter.get_flop_counts()[k].values()) for k in rotary)


def test_plain_step_matches_torch_flop_counter():
    model, _ = _tiny_llama()
    batch, seq = 2, 12
    ids = torch.randint(3, model.config.vocab_size, (batch, seq))
    shape = flops.shape_of(model.config)
    # HF computes the logits at every position
    forward = _measured(lambda: model(input_ids=ids), model)
    assert forward == flops.body_forward(shape, batch, seq) + flops.head_forward(shape, batch * seq)

    def train_step():
        model(input_ids=ids, labels=ids).loss.backward()

    assert _measured(train_step, model) == flops.plain_finetune(shape, batch, seq, counted=batch * seq).total


def test_repnoise_step_does_its_floor_of_matrix_work():
    """The defence's training step multiplies exactly what the floor counts (head only at the
    counted positions), plus one recomputation of the MMD Gram matrices in backward (and of the
    harmless body pass when it saves memory that way)."""
    model, tok = _tiny_llama(layers=3)
    data = [Example(f"How can I pick lock number {i}?", "Sure, here is how: first, second, third." * (1 + i % 2),
                    "I'm sorry, but I can't help with that request.") for i in range(3)]
    (harmful, harmless), = make_paired_batches(tok, data, 3, 64)
    batch, seq = harmful["input_ids"].shape
    pos = torch.arange(seq)[None, :]

    def counted(b):  # response tokens that are not padding, as labels (shifted by one)
        response = (pos >= b["prompt_lengths"][:, None]) & b["attention_mask"].bool()
        return int(response[:, 1:].sum())

    shape = flops.shape_of(model.config)
    floor = flops.repnoise(shape, batch, seq, counted(harmful), counted(harmless))
    assert counted(harmful) < batch * seq

    def run(recompute):
        gen = torch.Generator().manual_seed(0)
        return _measured(lambda: repnoise_backward(model, harmful, harmless, variant="corrected", generator=gen,
                                                   recompute_retain=recompute), model)

    exact = run(False)
    assert exact == floor.total + flops.mmd_forward(shape, batch, seq)
    # the memory-saving default recomputes the harmless pass's decoder layers in backward: at most
    # one body forward (torch's checkpoint stops recomputing a layer once its saved tensors are
    # back, so the MLP's last matrix may be skipped)
    extra = run(True) - exact
    last_mlp_matrix = 2 * batch * seq * shape.hidden * shape.intermediate * shape.layers
    assert flops.body_forward(shape, batch, seq) - last_mlp_matrix <= extra <= flops.body_forward(shape, batch, seq)
