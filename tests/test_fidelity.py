"""The ``paper`` preset reproduces the authors' pipeline (docs/fidelity.md), not just their loss.

Each test pins one reference behaviour on tiny local models and fixtures in the reference's
formats (tests/fixtures/fidelity: an authors'-format BeaverTails refusal file whose questions
repeat with different answers, and a ``30k_test``-like split with safe rows).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.api.components import DatasetRef, Example
from harness.api.config import attack_config, defence_config, resolve
from harness.api.errors import DataError
from harness.api.registry import ATTACKS, DEFENCES
from harness.lib import data as datamod
from harness.lib.context import StageContext
from harness.lib.datasets.beavertails import reference_category_filter, strip_question
from harness.lib.generation import generate
from harness.lib.text import encode, format_prompt, paired_batch, sft_batch
from harness.lib.training import lr_lambda, train_loop
from harness.pipeline import fidelity

FIXTURES = Path(__file__).parent / "fixtures" / "fidelity"
REFUSALS = FIXTURES / "beavertails_with_refusals_train.json"
TEST_SPLIT = FIXTURES / "beavertails_30k_test.jsonl"
SHARED_DT = Path(__file__).resolve().parents[2] / "shared" / "data" / "decoding_trust"


def bos_tokenizer(tok):
    """The tiny tokenizer made to put ``<s>`` first by default, as Llama-2's does."""
    from tokenizers.processors import TemplateProcessing

    tok = type(tok).from_pretrained(tok.name_or_path) if tok.name_or_path else tok
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # the fixture does what it says
    return tok


def ctx(stage="attack"):
    return StageContext(stage, seed=0, device=torch.device("cpu"), dtype=torch.float32, progress=False)


# --------------------------------------------------------------------------------------------
# 1. BOS: the tokenizer's default, exactly once
# --------------------------------------------------------------------------------------------

def test_bos_exactly_once_in_training_pairs_and_generation(tiny):
    model, plain = tiny
    tok = bos_tokenizer(plain)
    bos = tok.bos_token_id
    for loss_on in ("response", "all"):
        b = sft_batch(tok, ["q one", "a longer question two"], ["yes", "no"], 48, loss_on=loss_on)
        for row, mask in zip(b.input_ids, b.attention_mask):
            real = row[mask.bool()].tolist()
            assert real[0] == bos and real.count(bos) == 1, loss_on
    harmful, harmless = paired_batch(tok, ["q"], ["harm"], ["refuse"], 48)
    for part in (harmful, harmless):
        assert part["input_ids"][0, 0] == bos and int((part["input_ids"][0] == bos).sum()) == 1
    # a text that already starts with the BOS text (a chat template writing it) gets no second one
    assert encode(tok, "<s>Question: q").count(bos) == 1
    # generation: the prompt the model sees starts with one BOS (seen through a forward pre-hook)
    seen = []
    handle = model.model.embed_tokens.register_forward_pre_hook(lambda m, args: seen.append(args[0][0].tolist()))
    try:
        generate(model, tok, [format_prompt("q")], max_new_tokens=1, progress=False)
    finally:
        handle.remove()
    first = [t for t in seen[0] if t != tok.pad_token_id]
    assert first[0] == bos and first.count(bos) == 1
    # a tokenizer that adds no BOS (GPT-2 style, SmolLM2) gets none
    assert plain.bos_token_id not in sft_batch(plain, ["q"], ["a"], 32, loss_on="all").input_ids[0, :3].tolist()


# --------------------------------------------------------------------------------------------
# 2. No clipping in the paper preset
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("defence", [n for n in DEFENCES.names() if n not in ("none", "random_init")])
def test_paper_preset_never_clips(defence, monkeypatch, tiny):
    spec = resolve("paper", defence=defence, attack="harmfulqa")
    assert defence_config(spec).max_grad_norm is None and attack_config(spec).max_grad_norm is None
    assert attack_config(resolve("paper", defence=defence, attack="toxicity")).max_grad_norm is None
    # and a config without a norm never reaches the clipping call
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: pytest.fail("clipped"))
    model, tok = tiny
    b = sft_batch(tok, ["q"], ["a"], 16)
    train_loop(model, [b], attack_config(spec), ctx(), loss_fn=lambda m, x: m(**x.as_dict()).loss)


# --------------------------------------------------------------------------------------------
# 3. loss_on: all = mean over max_length - 1 EOS-padded positions per row
# --------------------------------------------------------------------------------------------

def test_reference_attack_loss_is_mean_over_max_length_minus_one_eos_padded_positions(tiny):
    model, tok = tiny
    max_length = 40
    b = sft_batch(tok, ["short q", "another question"], ["a", "a somewhat longer answer"], max_length, loss_on="all")
    assert b.input_ids.shape == (2, max_length)
    n_real = b.attention_mask.sum(1)
    for row, n in zip(b.input_ids, n_real):
        assert (row[int(n):] == tok.eos_token_id).all()  # EOS padding, not the tokenizer's pad token
    assert torch.equal(b.labels, b.input_ids)  # labels = the padded input ids
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        got = model(**b.as_dict()).loss
    per_position = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b.input_ids[:, 1:].reshape(-1),
                                   reduction="none")
    assert per_position.numel() == 2 * (max_length - 1)
    assert torch.allclose(got, per_position.mean(), atol=1e-5)
    # padding to the batch's longest row instead (the earlier behaviour) averages over fewer positions
    width = int(n_real.max())
    short = per_position.view(2, max_length - 1)[:, : width - 1].mean()
    assert not torch.allclose(short, got, atol=1e-4)


# --------------------------------------------------------------------------------------------
# 4. The authors' refusal file: one question per harmless text
# --------------------------------------------------------------------------------------------

def test_authors_refusal_file_gives_one_question_per_harmless_text(tiny):
    _, tok = tiny
    rows = datamod.load_dataset_ref(DatasetRef(name="beavertails", path=str(REFUSALS), duplicates="keep"))
    raw = json.loads(REFUSALS.read_text())
    assert len(rows) == len(raw) and all(ex.refusal for ex in rows)
    for ex in rows:
        assert "Question:" not in ex.refusal
        for sep in ("", "\n"):
            _, harmless = paired_batch(tok, [ex.prompt], [ex.response], [ex.refusal], 256, separator=sep)
            text = tok.decode(harmless["input_ids"][0][harmless["attention_mask"][0].bool()], skip_special_tokens=True)
            assert text.count("Question:") == 1 and text.count(ex.prompt) == 1
    # with the authors' join ("Answer:" + text) the harmless text is the file's refusal verbatim
    first = rows[0]
    _, harmless = paired_batch(tok, [first.prompt], [first.response], [first.refusal], 256, separator="")
    assert tok.decode(harmless["input_ids"][0], skip_special_tokens=True).rstrip(tok.eos_token or "") \
        .startswith(raw[0]["refusal"])
    # the same file as refusals_path for another copy of the questions
    ref = DatasetRef(name="beavertails", path=str(REFUSALS), refusals_path=str(REFUSALS))
    assert strip_question(raw[0]["refusal"]).lstrip() in {ex.refusal.lstrip() for ex in datamod.load_dataset_ref(ref)}


# --------------------------------------------------------------------------------------------
# 5. Toxicity: "Prompt:" and "Continuation:" markers, the authors' training rows
# --------------------------------------------------------------------------------------------

def test_toxicity_prompt_and_training_text_carry_both_markers(tiny):
    _, tok = tiny
    cfg = ATTACKS.get("toxicity").Config()
    prompt = format_prompt("some prompt", cfg.template)
    assert "\nPrompt: some prompt\nContinuation:" in prompt and prompt.endswith("Continuation:")
    b = sft_batch(tok, ["some prompt"], [" a continuation"], 128, loss_on="all", template=cfg.template,
                  separator=cfg.separator)
    text = tok.decode(b.input_ids[0][b.attention_mask[0].bool()])
    assert "Prompt: some prompt\nContinuation:  a continuation" in text  # the authors' "Continuation: " + text


def test_toxicity_attack_reads_the_107_with_refusals_rows():
    if not SHARED_DT.exists():
        pytest.skip("shared DecodingTrust sample not present")
    ref = DatasetRef(name="decoding_trust", path=str(SHARED_DT), type="toxic", source="with_refusals")
    rows = datamod.load_dataset_ref(ref)
    raw = json.loads((SHARED_DT / "with_refusals_train.json").read_text())
    assert [ex.prompt for ex in rows] == [r["prompt"]["text"].strip() for r in raw]
    assert rows[0].response == raw[0]["continuation"]["text"].rstrip()  # leading space kept, as the authors' text
    spec = resolve("paper", defence="none", attack="toxicity", sets=[f"attack.dataset.path={SHARED_DT}"])
    assert attack_config(spec).samples == len(rows)


# --------------------------------------------------------------------------------------------
# 6. Vaccine: the perturbation lands on the attention output
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_vaccine_perturbs_attention_outputs(arch):
    from defences.vaccine import OutputHooks
    from harness.lib.layers import decoder_layers
    from harness.lib.tiny import build_tiny

    model, tok = build_tiny(arch=arch)
    layers = decoder_layers(model)
    ids = tok(["Question: q\nAnswer: a"], return_tensors="pt")["input_ids"]
    with OutputHooks(model, "attention") as hooks:
        assert [id(m) for m in hooks.layers] == [id(getattr(l, "self_attn", None) or l.attn) for l in layers]
        seen: dict[int, torch.Tensor] = {}

        def capture(i):  # registered after the Vaccine hooks: sees what the layer receives
            return lambda m, a, out: seen.__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach().clone())

        handles = [m.register_forward_hook(capture(i)) for i, m in enumerate(hooks.layers)]
        try:
            with torch.no_grad():
                model(input_ids=ids)
                clean = dict(seen)
                deltas = [torch.full_like(clean[i], 0.5 * (i + 1)) for i in range(len(layers))]
                hooks.perturbations, hooks.mode = deltas, "perturb"
                model(input_ids=ids)
                hooks.mode = None
        finally:
            for h in handles:
                h.remove()
    # the first attention output is shifted by exactly its delta (later ones also see upstream changes)
    assert torch.allclose(seen[0], clean[0] + deltas[0], atol=1e-5)
    for i in range(len(layers)):
        assert not torch.allclose(seen[i], clean[i])
    # perturb: layer puts it on the decoder layer's output instead: attention outputs of layer 0 unchanged
    with OutputHooks(model, "layer") as hooks:
        assert [id(m) for m in hooks.layers] == [id(l) for l in layers]


# --------------------------------------------------------------------------------------------
# 7. The paper's 10k/10k cell (scaled): drawable the authors' way, or refused with what to change
# --------------------------------------------------------------------------------------------

def _paper_cell(*sets):
    base = [f"defence.dataset.path={REFUSALS}", f"attack.dataset.path={REFUSALS}",
            f"attack.eval_dataset.path={TEST_SPLIT}", "defence.samples=12", "attack.samples=12", "eval.samples=2"]
    return resolve("paper", defence="repnoise", attack="harmfulqa", sets=base + list(sets))


def _draw(spec):
    reqs = datamod.requests_for(spec, DEFENCES.get(spec.defence.name), defence_config(spec), attack_config(spec))
    return datamod.draw(reqs, spec.seed, spec.disjoint)


def test_paper_cell_is_drawable_from_a_file_with_beavertails_duplicates():
    raw = json.loads(REFUSALS.read_text())
    assert len({r["prompt"] for r in raw}) == len(raw) // 2  # every question twice, as BeaverTails' repeat
    parts = _draw(_paper_cell())
    # the authors' draw: both roles take the first rows of the file, in file order (they overlap)
    assert [ex.prompt for ex in parts["defence"]] == [r["prompt"] for r in raw[:12]]
    assert [ex.prompt for ex in parts["attack"]] == [r["prompt"] for r in raw[:12]]
    assert [ex.prompt for ex in parts["eval"]] == ["test question 3", "test question 5"]
    plan = {row["role"]: row for row in fidelity.data_plan(_paper_cell())}
    assert plan["defence"]["rows"] == 12 and plan["attack"]["rows"] == 12 and plan["defence"]["available"] == 24


def test_disjoint_cell_without_duplicates_is_refused_with_what_to_change():
    spec = _paper_cell("disjoint=true", "defence.dataset.duplicates=first", "attack.dataset.duplicates=first",
                       "defence.dataset.selection=seeded", "attack.dataset.selection=seeded")
    with pytest.raises(DataError) as err:
        _draw(spec)
    msg = str(err.value)
    assert "holds 12 examples but 24 were requested" in msg
    assert "duplicates=keep" in msg and "selection=reference" in msg and "disjoint=false" in msg
    # the dry run reports the same refusal instead of failing
    assert any("duplicates=keep" in (row.get("error") or "") for row in fidelity.data_plan(spec))
    # every row kept but disjoint by question: the shared questions are named, with the way out
    spec = _paper_cell("disjoint=true", "defence.dataset.selection=file", "attack.dataset.selection=file")
    with pytest.raises(DataError, match="share .* prompt.*disjoint=false"):
        _draw(spec)
    # selection=reference with disjoint=true is a contradiction, said as such
    with pytest.raises(DataError, match="roles overlap; set disjoint=false"):
        _draw(_paper_cell("disjoint=true"))


# --------------------------------------------------------------------------------------------
# 8. Evaluation prompts: the authors' first rows in file order, with their category pairing
# --------------------------------------------------------------------------------------------

def test_reference_eval_selection_keeps_the_authors_rows():
    rows = [json.loads(line) for line in TEST_SPLIT.read_text().splitlines()]
    kept = [r["prompt"] for r in reference_category_filter(rows) if not r["is_safe"]]
    # row i is checked against the first category of the i-th flagged row (safe rows flag none)
    assert kept == ["test question 3", "test question 5", "test question 6"]
    ex = datamod.load_dataset_ref(DatasetRef(name="beavertails", path=str(TEST_SPLIT), categories="reference",
                                             duplicates="keep", selection="reference"))
    assert [e.prompt for e in ex] == kept


# --------------------------------------------------------------------------------------------
# 9. Order and schedule
# --------------------------------------------------------------------------------------------

def test_file_order_and_transformers_warmup():
    from defences._common import training_order
    from transformers import get_cosine_schedule_with_warmup

    data = list(range(20))
    spec = resolve("paper", defence="repnoise", attack="harmfulqa")
    assert training_order(data, defence_config(spec), ctx()) == data
    assert training_order(data, DEFENCES.get("repnoise").Config(), ctx()) != data  # default: seeded shuffle
    total, ratio = 25, 0.1
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_cosine_schedule_with_warmup(opt, num_warmup_steps=total * ratio, num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        hf.step()
    ours = lr_lambda("cosine", total, total * ratio, from_zero=True)
    assert [ours(s) for s in range(total)] == pytest.approx(expected)
    assert ours(0) == 0.0 and lr_lambda("cosine", total, 2)(0) > 0


# --------------------------------------------------------------------------------------------
# 10. The dry run prints every choice; the paper preset matches the authors' on all of them
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attack", ["harmfulqa", "toxicity"])
def test_paper_preset_matches_every_reference_choice(attack):
    for defence in DEFENCES.names():
        spec = resolve("paper", defence=defence, attack=attack)
        rows = fidelity.describe(spec)
        assert rows and all(r["matches"] for r in rows), [r for r in rows if not r["matches"]]
    smoke = fidelity.describe(resolve("smoke", defence="vaccine", attack=attack))
    assert not all(r["matches"] for r in smoke)  # the smoke preset keeps the harness's own choices


def test_dry_run_prints_every_value(capsys):
    from harness.cli import main

    assert main(["run", "--preset", "paper", "--defence", "vaccine", "--attack", "harmfulqa", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    printed = {r["option"]: r["value"] for r in out["fidelity"]["choices"]}
    for option in ("disjoint", "eval.samples", "eval.max_new_tokens", "defence.max_grad_norm", "defence.shuffle",
                   "defence.separator", "defence.dataset.duplicates", "defence.dataset.selection", "defence.loss_on",
                   "defence.perturb", "defence.train_on", "defence.keep_clean_grad", "attack.max_grad_norm",
                   "attack.loss_on", "attack.max_length", "attack.separator", "attack.eval_dataset.selection",
                   "attack.eval_dataset.categories"):
        assert option in printed, option
    assert printed["eval.max_new_tokens"] == 50 and printed["defence.perturb"] == "attention"
    assert {row["role"] for row in out["data"]} == {"defence", "attack", "eval"}
    assert main(["run", "--preset", "paper", "--defence", "repnoise", "--attack", "harmfulqa", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["option"]: r["value"] for r in out["fidelity"]["choices"]}["defence.max_length"] == 128
    assert main(["run", "--preset", "paper", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fidelity"]["summary"] == "reference"
    assert all(p["fidelity"]["summary"] == "reference" for p in out["defences"].values())
