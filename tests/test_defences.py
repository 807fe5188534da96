"""The built-in defences: registration and paper defaults, and on the tiny model that each does
what it claims (and would fail if it did nothing or the wrong thing)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from pydantic import ValidationError

from defences._common import lm_loss, make_paired_batches, make_sft_batches
from harness.api.components import ComponentConfig, DatasetRef, Example, TrainConfig
from harness.lib.context import StageContext
from harness.api.errors import ConfigError, DataError
from harness.lib.layers import UnsupportedArchitecture
from harness.api.registry import DEFENCES, describe
from harness.lib.tiny import build_tiny
from harness.lib.training import train_loop

NAMES = ["repnoise", "security_vectors", "vaccine", "gradient_ascent", "adversarial_loss", "safety_training",
         "random_init"]


def examples(n: int = 8) -> list[Example]:
    return [Example(f"How can I pick lock number {i}?",
                    "Sure, here is how to do it step by step: first, second, third." * (1 + i % 2),
                    "I'm sorry, but I can't help with that request.") for i in range(n)]


def ctx(stage="defence", seed=0):
    return StageContext(stage=stage, seed=seed, progress=False)


def mean_ce(model, tok, data, field):
    batch = make_sft_batches(tok, data, field, len(data), 256)[0]
    with torch.no_grad():
        return float(lm_loss(model, batch))


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_change(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# --------------------------------------------------------------------------------------------
# registration, docs, configs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_registered_documented_and_typed(name):
    cls = DEFENCES.get(name)
    assert cls.registry_name == name
    assert describe(cls) and len(describe(cls)) < 120
    module_doc = inspect.getmodule(cls).__doc__
    assert module_doc and "default" in module_doc.lower() and ("et al" in module_doc)
    assert issubclass(cls.Config, ComponentConfig)
    with pytest.raises(ValidationError):
        cls.Config(no_such_key=1)
    cfg = cls.Config()
    if cls.needs_data:
        assert isinstance(cfg, TrainConfig)
        assert cfg.dataset == DatasetRef(name="beavertails", split="30k_train")
        assert cfg.samples == 10000
    else:
        assert name == "random_init"


def test_paper_defaults():
    rep = DEFENCES.get("repnoise").Config()
    assert (rep.lr, rep.optimizer, rep.scheduler, rep.warmup_ratio, rep.batch_size, rep.epochs, rep.max_length,
            rep.samples, rep.alpha, rep.beta, rep.freeze_layers, rep.variant) == \
        (2e-5, "adam", "cosine", 0.1, 8, 1, 256, 10000, 1.0, 0.001, 0, "reference")
    sv = DEFENCES.get("security_vectors").Config()
    assert (sv.r, sv.lora_alpha, sv.lora_dropout, sv.lr, sv.epochs) == (8, 32, 0.1, 1e-3, 1)
    assert DEFENCES.get("vaccine").Config().rho == 1.0
    assert DEFENCES.get("adversarial_loss").Config().alpha == 0.1
    assert DEFENCES.get("random_init").needs_data is False
    with pytest.raises(ValidationError):
        DEFENCES.get("repnoise").Config(variant="other")


def test_missing_fields_are_reported():
    cls = DEFENCES.get("repnoise")
    model, tok = build_tiny()
    data = [Example("q", "harmful answer", None)]
    with pytest.raises(DataError, match="refusal"):
        cls(cls.Config(samples=1)).apply(model, tok, data, ctx())
    with pytest.raises(DataError, match="no examples"):
        cls(cls.Config(samples=1)).apply(model, tok, [], ctx())


# --------------------------------------------------------------------------------------------
# every defence on every tiny architecture; unknown architectures are named
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral"])
@pytest.mark.parametrize("name", NAMES)
def test_runs_on_architecture(name, arch):
    model, tok = build_tiny(arch=arch)
    before = weights(model)
    cls = DEFENCES.get(name)
    cfg = cls.Config() if name == "random_init" else cls.Config(samples=4, batch_size=2, lr=1e-3)
    defence = cls(cfg)
    c = ctx()
    out = defence.apply(model, tok, examples(4), c)
    out = defence.prepare_eval(defence.prepare_attack(out, tok, c), tok, c)
    with torch.no_grad():
        logits = out(**{k: v for k, v in make_sft_batches(tok, examples(2), "response", 2, 64)[0].as_dict().items()
                        if k != "labels"}).logits
    assert torch.isfinite(logits).all()
    if name == "security_vectors":
        from defences.security_vectors import clean_base_state_dict

        after = clean_base_state_dict(out)
        assert max_change(before, after) == 0.0  # the adapter learns; the base does not
    elif name == "random_init":
        assert type(out) is type(model) and out is not model
    else:
        assert max_change(before, weights(out)) > 0
        assert "train" in c.stats


class _Weird(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"architectures": ["WeirdForCausalLM"], "model_type": "weird"})()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kw):  # pragma: no cover
        raise AssertionError("not reached")


@pytest.mark.parametrize("name", ["repnoise", "vaccine"])
def test_unsupported_architecture_is_named(name):
    _, tok = build_tiny()
    cls = DEFENCES.get(name)
    with pytest.raises(UnsupportedArchitecture, match="WeirdForCausalLM"):
        cls(cls.Config(samples=2, batch_size=2)).apply(_Weird(), tok, examples(2), ctx())


# --------------------------------------------------------------------------------------------
# baselines do what they claim
# --------------------------------------------------------------------------------------------

def test_safety_training_learns_refusals(tiny):
    model, tok = tiny
    data = examples(8)
    start = mean_ce(model, tok, data, "refusal")
    cls = DEFENCES.get("safety_training")
    cls(cls.Config(samples=8, batch_size=4, lr=3e-3, epochs=5)).apply(model, tok, data, ctx())
    assert mean_ce(model, tok, data, "refusal") < start - 1.0


def test_gradient_ascent_raises_harmful_loss_and_retain_holds_refusals(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    data = examples(8)
    cls = DEFENCES.get("gradient_ascent")
    results = {}
    for weight in (0.0, 1.0):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir)
        start = (mean_ce(model, tok, data, "response"), mean_ce(model, tok, data, "refusal"))
        c = ctx()
        cls(cls.Config(samples=8, batch_size=4, lr=1e-2, epochs=5, retain_weight=weight)).apply(model, tok, data, c)
        results[weight] = (mean_ce(model, tok, data, "response"), mean_ce(model, tok, data, "refusal"))
        assert results[weight][0] > start[0] + 1.0
        assert ("final_retain_ce" in c.stats["train"]) == (weight > 0)
    assert results[1.0][1] < results[0.0][1]  # the retain term keeps the refusals likelier


def test_adversarial_loss_separates_harmful_and_harmless(tiny):
    from defences.repnoise import difference_ce

    model, tok = tiny
    data = examples(8)
    pair = make_paired_batches(tok, data, 8, 64)[0]
    with torch.no_grad():
        h0, s0 = (float(x) for x in difference_ce(model, *pair))
    cls = DEFENCES.get("adversarial_loss")
    cls(cls.Config(samples=8, batch_size=4, lr=3e-3, epochs=5)).apply(model, tok, data, ctx())
    with torch.no_grad():
        h1, s1 = (float(x) for x in difference_ce(model, *pair))
    assert s1 < s0 - 0.5  # learns the refusal
    assert h1 > h0 + 0.3  # and unlearns the harmful answer
    assert h1 - s1 > h0 - s0 + 1.0


# --------------------------------------------------------------------------------------------
# Vaccine
# --------------------------------------------------------------------------------------------

def _train(tiny_dir, name, **cfg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    calls = []
    handle = model.register_forward_hook(lambda m, a, o: calls.append(1))
    cls = DEFENCES.get(name)
    c = ctx()
    cls(cls.Config(samples=8, batch_size=4, lr=1e-3, epochs=2, **cfg)).apply(model, tok, examples(8), c)
    handle.remove()
    return model, len(calls), c.stats["train"]


def test_vaccine_two_passes_and_perturbation_matters(tiny_dir):
    plain, plain_calls, _ = _train(tiny_dir, "safety_training")
    vac, vac_calls, stats = _train(tiny_dir, "vaccine", rho=1.0)
    zero, _, _ = _train(tiny_dir, "vaccine", rho=0.0)
    assert stats["steps"] == 4
    assert plain_calls == 4 and vac_calls == 8  # two forward passes per step
    assert all(torch.equal(a, b) for a, b in zip(zero.state_dict().values(), plain.state_dict().values()))
    assert max_change(weights(vac), weights(plain)) > 1e-4  # the perturbation changes the update
    assert stats["final_loss"] > stats["final_clean_loss"]  # the perturbed loss is the worse one


def _one_sgd_step(tiny_dir, name, **cfg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    before = weights(model)
    cls = DEFENCES.get(name)
    cls(cls.Config(samples=4, batch_size=4, lr=1e-2, epochs=1, optimizer="sgd", warmup_ratio=0.0,
                   max_grad_norm=None, shuffle=False, **cfg)).apply(model, tok, examples(4), ctx())
    after = weights(model)
    return {k: after[k] - before[k] for k in before}


def test_vaccine_keep_clean_grad_adds_the_first_pass_gradient(tiny_dir):
    """The authors' port keeps the unperturbed pass's weight gradient: with rho = 0 both passes are
    the same loss, so one SGD step moves the weights twice as far as plain safety training."""
    plain = _one_sgd_step(tiny_dir, "safety_training", loss_on="all")
    port = _one_sgd_step(tiny_dir, "vaccine", rho=0.0, keep_clean_grad=True, loss_on="all")
    vaccine = _one_sgd_step(tiny_dir, "vaccine", rho=0.0, loss_on="all")
    key = max(plain, key=lambda k: float(plain[k].abs().max()))
    assert torch.allclose(port[key], 2 * plain[key], rtol=1e-3, atol=1e-7)
    assert torch.allclose(vaccine[key], plain[key], rtol=1e-3, atol=1e-7)


def test_vaccine_trains_on_the_harmful_answers_when_asked(tiny_dir):
    """``train_on: response`` (the authors' port): descent on the harmful answers, i.e. exactly the
    opposite step of gradient ascent on them (rho = 0, one SGD step)."""
    on_refusals = _one_sgd_step(tiny_dir, "vaccine", rho=0.0)
    on_answers = _one_sgd_step(tiny_dir, "vaccine", rho=0.0, train_on="response")
    ascent = _one_sgd_step(tiny_dir, "gradient_ascent")
    key = max(ascent, key=lambda k: float(ascent[k].abs().max()))
    assert torch.allclose(on_answers[key], -ascent[key], rtol=1e-3, atol=1e-7)
    assert not torch.allclose(on_refusals[key], on_answers[key])


def test_baseline_loss_on_all_counts_the_whole_padded_text(tiny):
    _, tok = tiny
    data = examples(2)
    resp = make_sft_batches(tok, data, "refusal", 2, 48)[0]
    full = make_sft_batches(tok, data, "refusal", 2, 48, loss_on="all")[0]
    assert torch.equal(full.labels, full.input_ids) and full.input_ids.shape[1] == 48
    assert int((resp.labels != -100).sum()) < int((full.labels != -100).sum())


class _Captured(Exception):
    pass


@pytest.mark.parametrize("name", [n for n in NAMES if "template" in DEFENCES.get(n).Config.model_fields])
def test_defence_trains_on_the_configured_template(name, tiny, monkeypatch):
    """``template`` and ``separator`` shape the text every data defence trains on (a preset that
    attacks with a chat template trains its defences on the same text); the question's tokens
    (response-only masks, RepNoise's ``prompt_lengths``) are counted in that template."""
    import importlib

    from harness.lib.text import encode

    model, tok = tiny
    cls = DEFENCES.get(name)
    template, separator = "<<user>> {prompt} <<bot>>", " ~ "
    cfg = cls.Config(samples=4, batch_size=4, max_length=128, template=template, separator=separator)
    captured = []

    def capture(model, batches, *args, **kwargs):
        captured.extend(batches)
        raise _Captured

    monkeypatch.setattr(importlib.import_module(cls.__module__), "train_loop", capture)
    data = examples(4)
    with pytest.raises(_Captured):
        cls(cfg).apply(model, tok, data, ctx())
    first = captured[0]
    first = first[0] if isinstance(first, tuple) else first  # paired (harmful, harmless) or (harm, refusal)
    paired = isinstance(first, dict)
    ids, masks = (first["input_ids"], first["attention_mask"]) if paired else (first.input_ids, first.attention_mask)
    texts = [tok.decode(row[mask.bool()]) for row, mask in zip(ids, masks)]
    prompts = [text.split("<<user>> ", 1)[1].split(" <<bot>>", 1)[0] for text in texts if "<<user>> " in text]
    assert len(prompts) == len(texts) == 4, texts
    for text, prompt in zip(texts, prompts):
        assert prompt in {ex.prompt for ex in data}, text
        assert text.startswith(template.format(prompt=prompt) + separator), text
        assert "Question:" not in text and "Answer:" not in text
    lengths = [len(encode(tok, template.format(prompt=p))) for p in prompts]
    if paired:  # the masks of the corrected losses count the templated question's tokens
        assert first["prompt_lengths"].tolist() == lengths
    else:  # response-only loss: exactly the templated question is masked out
        assert [int((row[mask.bool()] == -100).sum()) for row, mask in zip(first.labels, masks)] == lengths


def test_defence_template_must_hold_the_question():
    cls = DEFENCES.get("repnoise")
    with pytest.raises(ValidationError, match="must contain {prompt}"):
        cls.Config(template="Question: Answer:")
    with pytest.raises(ValidationError, match="other than {prompt}"):
        cls.Config(template="{prompt} {answer}")


def test_vaccine_perturbation_has_norm_rho():
    from defences.vaccine import perturbations

    g = [torch.randn(2, 3, 4), None, torch.randn(2, 3, 4)]
    eps = perturbations(g, 2.0)
    assert eps[1] is None
    total = torch.stack([eps[0].norm(), eps[2].norm()]).norm()
    assert float(total) == pytest.approx(2.0, rel=1e-5)
    assert torch.allclose(eps[0] / eps[0].norm(), g[0] / g[0].norm())


# --------------------------------------------------------------------------------------------
# Security vectors
# --------------------------------------------------------------------------------------------

def _inputs(tok, n=2):
    b = make_sft_batches(tok, examples(n), "response", n, 64)[0]
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask}


def test_security_vectors_lifecycle(tiny, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from defences.security_vectors import SecurityVectors, adapter_parameters, clean_base_state_dict

    model, tok = tiny
    data = examples(8)
    base = weights(model)
    sv = SecurityVectors(SecurityVectors.Config(samples=8, batch_size=4, lr=1e-2, epochs=5))
    c = ctx()
    pm = sv.apply(model, tok, data, c)
    losses = c.stats["train"]["losses"]
    assert losses[-1] < losses[0]  # the adapter learned the harmful answers
    assert max_change(base, clean_base_state_dict(pm)) == 0.0

    # attack: adapter active and frozen, only the base weights train
    pm = sv.prepare_attack(pm, tok, ctx("attack"))
    assert all(not p.requires_grad for p in adapter_parameters(pm))
    assert all(p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n)
    adapter = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    batches = make_sft_batches(tok, data, "response", 4, 256)
    attack_cfg = TrainConfig(lr=1e-3, samples=8)
    with_sv = train_loop(pm, batches, attack_cfg, ctx("attack"), loss_fn=lm_loss)
    assert all(torch.equal(adapter[n], p) for n, p in pm.named_parameters() if "lora_" in n)
    attacked_base = clean_base_state_dict(pm)
    assert max_change(base, attacked_base) > 0

    plain = AutoModelForCausalLM.from_pretrained(tiny_dir)
    without_sv = train_loop(plain, batches, attack_cfg, ctx("attack"), loss_fn=lm_loss)
    assert with_sv.losses[0] < without_sv.losses[0] - 0.1  # the adapter is active during the attack

    # evaluation: adapter off, i.e. exactly the attacked base weights
    pm = sv.prepare_eval(pm, tok, ctx("eval"))
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir)
    reference.load_state_dict(attacked_base)
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(**_inputs(tok)).logits, reference(**_inputs(tok)).logits)


def test_security_vectors_save_and_load(tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from defences import security_vectors
    from defences.security_vectors import ADAPTER_DIR, SecurityVectors, adapter_parameters, set_adapter_enabled
    from harness.lib.checkpoints import is_complete

    model, tok = tiny
    sv = SecurityVectors(SecurityVectors.Config(samples=4, batch_size=4, lr=1e-2, epochs=3))
    pm = sv.apply(model, tok, examples(4), ctx())
    pm.eval()
    inputs = _inputs(tok)
    with torch.no_grad():
        on = pm(**inputs).logits
        set_adapter_enabled(pm, False)
        off = pm(**inputs).logits
        set_adapter_enabled(pm, True)
    assert not torch.allclose(on, off)
    folder = tmp_path / "defended"
    sv.save_defended(pm, tok, folder, meta={"trial": "x"})
    assert is_complete(folder) and (folder / ADAPTER_DIR / "adapter_config.json").exists()
    # the folder is an ordinary checkpoint of the base weights
    plain = AutoModelForCausalLM.from_pretrained(folder)
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, off)

    def fake_base_load(model_spec, folder, device, dtype):  # what lib.models.load_checkpoint returns
        return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)

    monkeypatch.setattr(security_vectors, "load_checkpoint", fake_base_load)
    loaded, _ = sv.load_defended(folder, None, torch.device("cpu"), torch.float32)
    loaded.eval()
    assert all(not p.requires_grad for p in adapter_parameters(loaded))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, on)
        sv.prepare_eval(loaded, tok, ctx("eval"))
        torch.testing.assert_close(loaded(**inputs).logits, off)


def test_security_vectors_refuses_a_model_without_adapter(tiny):
    from defences.security_vectors import SecurityVectors

    model, tok = tiny
    with pytest.raises(ConfigError, match="no security-vector adapter"):
        SecurityVectors().prepare_attack(model, tok, ctx("attack"))


# --------------------------------------------------------------------------------------------
# random init
# --------------------------------------------------------------------------------------------

def test_random_init_is_a_fresh_seeded_model(tiny):
    model, tok = tiny
    cls = DEFENCES.get("random_init")
    a = cls().apply(model, tok, [], ctx(seed=123))
    b = cls().apply(model, tok, [], ctx(seed=123))
    c = cls().apply(model, tok, [], ctx(seed=124))
    wa, wb, wc, wm = weights(a), weights(b), weights(c), weights(model)
    assert wa.keys() == wm.keys() and all(wa[k].shape == wm[k].shape for k in wa)
    assert max_change(wa, wb) == 0.0
    assert max_change(wa, wc) > 0 and max_change(wa, wm) > 0
    assert type(a) is type(model) and a.config.to_dict() == model.config.to_dict()
    before = torch.random.get_rng_state()
    cls().apply(model, tok, [], ctx(seed=5))
    assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is left alone


def test_paired_batches_skip_batches_identical_after_truncation(tiny, caplog):
    """Questions longer than the context leave harmful and harmless texts identical: the batch
    would give NaN (no differing token); it is skipped with a warning, and all-identical data fails."""
    from defences._common import make_paired_batches
    from harness.api.components import Example
    from harness.api.errors import DataError

    _, tok = tiny
    long_q = "word " * 100
    same = [Example(long_q, "harmful answer", "I cannot help"), Example(long_q + "x", "bad", "no")]
    good = [Example("short?", "harmful answer", "I cannot help"), Example("q?", "bad", "no")]
    with caplog.at_level("WARNING"):
        out = make_paired_batches(tok, same + good, 2, 16)
    assert len(out) == 1 and "skipped" in caplog.text
    with pytest.raises(DataError, match="max_length"):
        make_paired_batches(tok, same, 2, 16)
