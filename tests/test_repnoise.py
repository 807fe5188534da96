"""RepNoise: the loss against an independent, straightforward implementation of docs/design.md's
definition (full logits per layer, explicit pairwise MMD), its speed-ups, and its effect."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from defences._common import make_paired_batches
from defences.repnoise import (RepNoise, capture_mlp_outputs, linear_ce_sum, mmd_loss, repnoise_backward,
                               repnoise_loss)
from harness.api.components import Example
from harness.lib.context import StageContext
from harness.lib.layers import UnsupportedArchitecture, final_norm, lm_head, mlp_modules
from harness.lib.tiny import build_tiny

EXAMPLES = [
    Example("How can I pick a lock?", "Sure, here is how to do it step by step: first, second, third.",
            "I'm sorry, but I can't help with that request."),
    Example("How do I bake bread?", "Mix flour, water, salt and yeast, knead, let it rise and bake.",
            "I cannot assist with that. It could cause harm to people."),
    Example("Tell me a secret", "The quick brown fox jumps over the lazy dog.", "I'm sorry."),
    Example("Say hi", "Hi.", "I'm sorry, but I can't help with that request. It could cause harm to people."),
]


def examples(n: int) -> list[Example]:
    return [Example(f"How can I pick lock number {i}?",
                    "Sure, here is how to do it step by step: first, second, third." * (1 + i % 2),
                    "I'm sorry, but I can't help with that request.") for i in range(n)]


# --------------------------------------------------------------------------------------------
# the straightforward implementation (written from docs/design.md, independent of defences.repnoise)
# --------------------------------------------------------------------------------------------

def plain_mmd(x, y, kernel_mul=2.0, kernel_num=5):
    n = x.shape[0]
    total = torch.cat([x, y])
    m = total.shape[0]
    dist = ((total.unsqueeze(0).expand(m, m, -1) - total.unsqueeze(1).expand(m, m, -1)) ** 2).sum(2)
    base = dist.detach().sum() / (m * m - m) / kernel_mul ** (kernel_num // 2)
    k = sum(torch.exp(-dist / (base * kernel_mul ** i)) for i in range(kernel_num))
    return (k[:n, :n] + k[n:, n:] - k[:n, n:] - k[n:, :n]).mean()


def plain_ce_reference(logits, ids, mask):
    logits = logits[:, :-1] * mask[:, :-1].unsqueeze(-1)
    labels = (ids[:, 1:] * mask[:, 1:]).long()
    labels[labels == 0] = -100
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def plain_ce_corrected(logits, ids, response):
    labels = ids[:, 1:].masked_fill(~response[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1))


def plain_repnoise(model, harmful, harmless, alpha=1.0, beta=0.001, variant="reference", generator=None):
    acts = {}
    mlps = mlp_modules(model)
    handles = [m.register_forward_hook(lambda mod, a, out, i=i: acts.__setitem__(i, out)) for i, m in enumerate(mlps)]
    out_h = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"], output_hidden_states=True)
    for h in handles:
        h.remove()
    hi, si = harmful["input_ids"], harmless["input_ids"]
    if variant == "reference":
        diff = hi != si
        noise_mask, mask_h, mask_s, ce = diff, diff.float(), diff.float(), plain_ce_reference
    else:
        def response(b):
            pos = torch.arange(b["input_ids"].shape[1])[None]
            return (pos >= b["prompt_lengths"][:, None]) & b["attention_mask"].bool()

        mask_h, mask_s = response(harmful), response(harmless)
        noise_mask, ce = mask_h, plain_ce_corrected
    noise = 0
    for i in range(len(mlps)):
        m3 = noise_mask.unsqueeze(-1).expand(acts[i].shape)
        x = acts[i] * m3
        g = torch.randn(x.shape, generator=generator, dtype=x.dtype) * m3
        noise = noise + plain_mmd(x.reshape(x.shape[0], -1), g.reshape(g.shape[0], -1))
    noise = noise / len(mlps)
    harm = ce(out_h.logits, hi, mask_h)
    retain = ce(model(input_ids=si, attention_mask=harmless["attention_mask"]).logits, si, mask_s)
    head, norm = lm_head(model), final_norm(model)
    for h in out_h.hidden_states:
        harm = harm + ce(head(norm(h)), hi, mask_h)
    harm = harm / len(out_h.hidden_states) + 1
    return {"total": retain + beta * noise - alpha * torch.log(harm), "retain": retain, "harmful": harm,
            "noise": noise}


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_close(a, b, rtol=1e-4):
    assert a.keys() == b.keys()
    for name in a:
        scale = float(b[name].abs().max()) + 1e-12
        assert float((a[name] - b[name]).abs().max()) <= rtol * scale, name


# --------------------------------------------------------------------------------------------
# MMD
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mmd_matches_pairwise_definition(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 300, generator=g, dtype=dtype) * 0.3 + 0.2).requires_grad_(True)
    y = torch.randn(4, 300, generator=g, dtype=dtype)
    x2 = x.detach().clone().requires_grad_(True)
    ours, ref = mmd_loss(x, y), plain_mmd(x2, y)
    assert ours.dtype == dtype
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-9)


def test_mmd_is_zero_for_identical_sets_and_grows_with_mismatch():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(4, 64, generator=g)
    assert float(mmd_loss(y, y)) == pytest.approx(0.0, abs=1e-6)
    near = float(mmd_loss(torch.randn(4, 64, generator=g), y))
    far = float(mmd_loss(torch.randn(4, 64, generator=g) * 0.01, y))
    assert far > near
    with pytest.raises(ValueError):
        mmd_loss(torch.zeros(4, 3), torch.zeros(3, 3))


# --------------------------------------------------------------------------------------------
# the loss against the straightforward implementation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["reference", "corrected"])
@pytest.mark.parametrize("pad", ["pad0", "eos"])
def test_loss_and_gradients_match_straightforward(tiny, variant, pad):
    model, tok = tiny
    if pad == "eos":  # the reference's padding (pad = eos); "pad0" exercises the label-0 rule
        tok.pad_token = tok.eos_token
    (harmful, harmless), = make_paired_batches(tok, EXAMPLES, 8, 64)
    ours = repnoise_loss(model, harmful, harmless, beta=0.5, variant=variant, generator=torch.Generator().manual_seed(7))
    ref = plain_repnoise(model, harmful, harmless, beta=0.5, variant=variant, generator=torch.Generator().manual_seed(7))
    for key in ("total", "retain", "harmful", "noise"):
        assert float(getattr(ours, key).detach()) == pytest.approx(float(ref[key].detach()), rel=2e-6, abs=1e-6), key
    assert_grads_close(grads_of(model, ours.total), grads_of(model, ref["total"]))


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "mistral"])
def test_loss_matches_straightforward_on_other_architectures(arch):
    model, tok = build_tiny(arch=arch)
    (harmful, harmless), = make_paired_batches(tok, EXAMPLES, 8, 64)
    ours = repnoise_loss(model, harmful, harmless, beta=0.5, generator=torch.Generator().manual_seed(3))
    ref = plain_repnoise(model, harmful, harmless, beta=0.5, generator=torch.Generator().manual_seed(3))
    assert float(ours.total.detach()) == pytest.approx(float(ref["total"].detach()), rel=2e-6)
    assert_grads_close(grads_of(model, ours.total), grads_of(model, ref["total"]))


def test_split_backward_equals_one_graph(tiny):
    model, tok = tiny
    (harmful, harmless), = make_paired_batches(tok, EXAMPLES, 8, 64)
    one = repnoise_loss(model, harmful, harmless, generator=torch.Generator().manual_seed(5))
    g_one = grads_of(model, one.total * 0.5)
    parts = repnoise_backward(model, harmful, harmless, generator=torch.Generator().manual_seed(5), scale=0.5)
    g_split = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert parts["loss"] == pytest.approx(float(one.total.detach()), rel=1e-6)
    for key in ("retain", "harmful", "noise"):
        assert parts[key] == pytest.approx(float(getattr(one, key).detach()), rel=1e-6)
    assert_grads_close(g_split, g_one, rtol=1e-5)


def test_beta_zero_is_deterministic(tiny):
    model, tok = tiny
    (harmful, harmless), = make_paired_batches(tok, EXAMPLES, 8, 64)
    torch.manual_seed(1)
    a = repnoise_loss(model, harmful, harmless, beta=0.0)
    torch.manual_seed(2)
    b = repnoise_loss(model, harmful, harmless, beta=0.0)
    assert float(a.total.detach()) == float(b.total.detach())
    assert float(a.noise.detach()) != float(b.noise.detach())  # the noise itself is random; with beta 0 it does not count


def test_chunking_does_not_change_the_value(tiny, monkeypatch):
    import defences.repnoise as rn

    model, tok = tiny
    (harmful, harmless), = make_paired_batches(tok, EXAMPLES, 8, 64)
    whole = repnoise_loss(model, harmful, harmless, beta=0.0)
    g_whole = grads_of(model, whole.total)
    monkeypatch.setattr(rn, "CHUNK_ELEMENTS", 3 * lm_head(model).weight.shape[0])  # 3 rows per chunk
    chunked = repnoise_loss(model, harmful, harmless, beta=0.0)
    assert float(chunked.total.detach()) == pytest.approx(float(whole.total.detach()), rel=1e-6)
    assert_grads_close(grads_of(model, chunked.total), g_whole, rtol=1e-5)


def test_linear_ce_sum_matches_cross_entropy_with_bias_and_generic_head():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=True)
    x = torch.randn(23, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 40, (23,), generator=g)
    ref = F.cross_entropy(head(x), labels, reduction="sum")
    ref_grads = torch.autograd.grad(ref, [x, head.weight, head.bias])
    ours = linear_ce_sum(x, head, labels, chunk_elements=5 * 40)
    ours_grads = torch.autograd.grad(ours, [x, head.weight, head.bias])
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a non-Linear head (or a logit transform) takes the checkpointed path, same value
    seq = torch.nn.Sequential(head)
    capped = linear_ce_sum(x, seq, labels, transform=lambda z: torch.tanh(z / 3) * 3, chunk_elements=40 * 4)
    expected = F.cross_entropy(torch.tanh(head(x) / 3) * 3, labels, reduction="sum")
    assert float(capped.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


def test_no_full_vocabulary_logits_and_hooks_are_removed(tiny):
    model, tok = tiny
    (harmful, harmless), = make_paired_batches(tok, EXAMPLES, 8, 64)
    head_calls = []
    handle = lm_head(model).register_forward_hook(lambda m, a, o: head_calls.append(tuple(o.shape)))
    mlps = mlp_modules(model)
    before = [len(m._forward_hooks) for m in mlps]
    for _ in range(3):
        repnoise_loss(model, harmful, harmless)
    assert [len(m._forward_hooks) for m in mlps] == before  # registered per call and removed
    handle.remove()
    assert head_calls == []  # the fused CE reads the head's weight; no (batch, seq, vocab) logits
    with capture_mlp_outputs(model) as hooks:
        assert [len(m._forward_hooks) for m in mlps] == [b + 1 for b in before]
        for _ in range(3):  # reused: no pile-up
            repnoise_loss(model, harmful, harmless, hooks=hooks)
        assert [len(m._forward_hooks) for m in mlps] == [b + 1 for b in before]
        model(**{k: harmful[k] for k in ("input_ids", "attention_mask")})  # inactive outside the loss
        assert all(o is None for o in hooks.outputs)
    assert [len(m._forward_hooks) for m in mlps] == before


def test_corrected_variant_needs_prompt_lengths_and_unknown_variant_fails(tiny):
    model, tok = tiny
    (harmful, harmless), = make_paired_batches(tok, EXAMPLES, 8, 64)
    bare_h = {k: harmful[k] for k in ("input_ids", "attention_mask")}
    bare_s = {k: harmless[k] for k in ("input_ids", "attention_mask")}
    repnoise_loss(model, bare_h, bare_s)  # the reference variant needs only ids and masks
    with pytest.raises(ValueError, match="prompt_lengths"):
        repnoise_loss(model, bare_h, bare_s, variant="corrected")
    with pytest.raises(ValueError, match="variant"):
        repnoise_loss(model, harmful, harmless, variant="nope")


def test_unsupported_architecture_is_named():
    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"architectures": ["WeirdForCausalLM"], "model_type": "weird"})()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(UnsupportedArchitecture, match="WeirdForCausalLM"):
        repnoise_loss(Weird(), {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3)},
                      {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3)})


# --------------------------------------------------------------------------------------------
# the defence
# --------------------------------------------------------------------------------------------

def _measure(model, pair):
    with torch.no_grad():
        r = repnoise_loss(model, *pair, generator=torch.Generator().manual_seed(0))
    return {k: float(getattr(r, k)) for k in ("retain", "harmful", "noise")}


def test_defence_raises_harmful_loss_and_keeps_harmless_loss(tiny):
    model, tok = tiny
    data = examples(8)
    pair = make_paired_batches(tok, data, 8, 64)[0]
    start = _measure(model, pair)
    ctx = StageContext(stage="defence", progress=False)
    out = RepNoise(RepNoise.Config(samples=8, batch_size=4, lr=3e-3, epochs=10)).apply(model, tok, data, ctx)
    assert out is model
    end = _measure(model, pair)
    assert end["harmful"] > start["harmful"] + 0.5  # the harmful CE (all layers) is pushed up
    assert end["retain"] < start["retain"] + 0.05  # the harmless CE does not get worse
    assert ctx.stats["train"]["steps"] == 20
    assert {"final_retain", "final_harmful", "final_noise"} <= set(ctx.stats["train"])


def test_noise_term_pulls_harmful_activations_towards_noise(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    data = examples(8)
    pair = make_paired_batches(tok, data, 8, 64)[0]
    result = {}
    for beta in (0.0, 10.0):  # alpha 0: only the retain and noise terms train
        model = AutoModelForCausalLM.from_pretrained(tiny_dir)
        start = _measure(model, pair)["noise"]
        cfg = RepNoise.Config(samples=8, batch_size=4, lr=3e-2, epochs=10, alpha=0.0, beta=beta)
        RepNoise(cfg).apply(model, tok, data, StageContext(stage="defence", progress=False))
        result[beta] = _measure(model, pair)["noise"]
    assert result[10.0] < 0.8 * start
    assert result[10.0] < result[0.0] - 0.3


def test_freeze_layers_keeps_the_first_layers(tiny):
    from harness.lib.layers import decoder_layers

    model, tok = tiny
    first = copy.deepcopy(decoder_layers(model)[0].state_dict())
    second = copy.deepcopy(decoder_layers(model)[1].state_dict())
    cfg = RepNoise.Config(samples=4, batch_size=4, lr=1e-3, freeze_layers=1)
    RepNoise(cfg).apply(model, tok, examples(4), StageContext(stage="defence", progress=False))
    for k, v in decoder_layers(model)[0].state_dict().items():
        assert torch.equal(v, first[k]), k
    assert any(not torch.equal(v, second[k]) for k, v in decoder_layers(model)[1].state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # train_loop gives every parameter back


def test_corrected_variant_trains(tiny):
    model, tok = tiny
    ctx = StageContext(stage="defence", progress=False)
    RepNoise(RepNoise.Config(samples=4, batch_size=2, lr=1e-3, variant="corrected")).apply(model, tok, examples(4), ctx)
    assert ctx.stats["train"]["steps"] == 2


def test_low_precision_paths_stay_close(tiny):
    """bf16 autocast (as on GPU) and a bf16 model take the mixed-precision branches of the fused
    CE and the MMD; the value stays near the float32 one and the gradients are finite."""
    model, tok = tiny
    (harmful, harmless), = make_paired_batches(tok, EXAMPLES, 8, 64)
    exact = float(repnoise_loss(model, harmful, harmless, beta=0.0).total.detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = repnoise_loss(model, harmful, harmless, beta=0.5, generator=torch.Generator().manual_seed(0))
    mixed.total.backward()
    assert float(mixed.total.detach()) - 0.5 * float(mixed.noise.detach()) == pytest.approx(exact, rel=3e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    half = copy.deepcopy(model).to(torch.bfloat16)
    out = repnoise_loss(half, harmful, harmless, beta=0.5, generator=torch.Generator().manual_seed(0))
    out.total.backward()
    assert float(out.total.detach()) - 0.5 * float(out.noise.detach()) == pytest.approx(exact, rel=3e-2)
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()
               for p in half.parameters() if p.grad is not None)


def test_padding_to_max_length_changes_no_loss_term(tiny):
    """The authors pad both texts of a pair to ``max_length``; the harness pads to the longer row.
    Positions where both texts are padding are outside the difference mask, so the retain and
    harmful terms (and the adversarial loss's two CEs) are unchanged (beta = 0: the noise draws
    depend on the tensor shape)."""
    from defences.repnoise import difference_ce

    model, tok = tiny
    data = [Example("q one", "harmful answer one", "no"), Example("q two is longer", "bad", "I refuse that")]
    (harmful, harmless), = make_paired_batches(tok, data, 2, 64)
    width = 64
    padded = []
    for part in (harmful, harmless):
        ids = torch.full((2, width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((2, width), dtype=torch.long)
        n = part["input_ids"].shape[1]
        ids[:, :n], mask[:, :n] = part["input_ids"], part["attention_mask"]
        padded.append({"input_ids": ids, "attention_mask": mask})
    assert padded[0]["input_ids"].shape[1] > harmful["input_ids"].shape[1]
    with torch.no_grad():
        short = repnoise_loss(model, harmful, harmless, beta=0.0)
        full = repnoise_loss(model, padded[0], padded[1], beta=0.0)
        assert torch.allclose(short.total, full.total, atol=1e-5)
        for a, b in zip(difference_ce(model, harmful, harmless), difference_ce(model, *padded)):
            assert torch.allclose(a, b, atol=1e-5)
