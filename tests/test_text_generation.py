import torch

from harness.lib.generation import generate, generate_one_by_one
from harness.lib.text import format_prompt, paired_batch, sft_batch


def test_sft_labels_response_only_vs_all(tiny):
    _, tok = tiny
    b = sft_batch(tok, ["hi", "a longer question here"], ["yes", "no"], 64, loss_on="response")
    n_prompt = len(tok(format_prompt("hi"), add_special_tokens=False)["input_ids"])
    assert (b.labels[0, :n_prompt] == -100).all()
    assert b.labels[0, n_prompt] != -100
    assert (b.labels[0][b.attention_mask[0] == 0] == -100).all()
    a = sft_batch(tok, ["hi", "a longer question here"], ["yes", "no"], 64, loss_on="all")
    assert torch.equal(a.labels, a.input_ids)  # the reference: labels = input ids, padding included


def test_paired_batch_same_length_right_padded(tiny):
    _, tok = tiny
    h, s = paired_batch(tok, ["q1", "q2"], ["bad answer long long", "bad"], ["no", "no no"], 64)
    assert h["input_ids"].shape == s["input_ids"].shape
    assert h["attention_mask"][:, 0].all()  # right padding: first token always real


def test_batched_generation_equals_one_by_one(tiny):
    model, tok = tiny
    prompts = [format_prompt(p) for p in ["short", "a much longer prompt with many words in it", "mid size one"]]
    a = generate(model, tok, prompts, max_new_tokens=8, batch_size=3, progress=False)
    b = generate_one_by_one(model, tok, prompts, max_new_tokens=8, progress=False)
    assert a == b


def test_sft_truncation_keeps_answer_tokens(tiny):
    _, tok = tiny
    long_prompt = "word " * 200
    b = sft_batch(tok, [long_prompt], ["the answer text"], 32, loss_on="response")
    assert b.input_ids.shape[1] <= 32
    assert (b.labels != -100).sum() > 0


def test_sft_all_pads_with_eos_to_max_length_and_response_mode_to_longest(tiny):
    _, tok = tiny
    a = sft_batch(tok, ["hi", "a longer question here"], ["yes", "no"], 40, loss_on="all")
    r = sft_batch(tok, ["hi", "a longer question here"], ["yes", "no"], 40, loss_on="response")
    assert a.input_ids.shape[1] == 40 and r.input_ids.shape[1] < 40
    assert (a.input_ids[a.attention_mask == 0] == tok.eos_token_id).all()


def test_separator_joins_answer_verbatim(tiny):
    from harness.lib.text import format_qa

    assert format_qa("q", "The answer", separator="") == "Question: q\nAnswer:The answer"
    assert format_qa("q", "The answer") == "Question: q\nAnswer:\nThe answer"
    _, tok = tiny
    b = sft_batch(tok, ["q"], ["The answer"], 64, loss_on="all", separator="")
    assert tok.decode(b.input_ids[0][b.attention_mask[0].bool()]) == "Question: q\nAnswer:The answer"
