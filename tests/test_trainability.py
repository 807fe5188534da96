"""Trainability: data-to-text loaders, batching, ROUGE, and fine-tuning a copy of the tiny model."""

import json
import time
from pathlib import Path

import pytest
import torch

from harness.lib.context import StageContext
from harness.api.errors import DataError
from harness.api.registry import DATASETS, METRICS

VIGGO = Path(__file__).resolve().parents[2] / "shared" / "data" / "viggo"
needs_viggo = pytest.mark.skipif(not (VIGGO / "train.csv").exists(), reason="../shared/data/viggo not present")

TOY = [("inform(name[Tetris], rating[excellent])", "Tetris is an excellent puzzle game."),
       ("inform(name[Tetris], rating[poor])", "Tetris is a poor game."),
       ("inform(name[Doom], rating[excellent])", "Doom is an excellent game."),
       ("inform(name[Doom], rating[poor])", "Doom is a poor game.")]


@pytest.fixture
def toy_dir(tmp_path):
    import csv

    for split in ("train", "test"):
        with (tmp_path / f"{split}.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["mr", "ref"])
            w.writerows(TOY)
    return tmp_path


def make(**kw):
    cls = METRICS.get("trainability")
    return cls(cls.Config(**kw))


# ---- loaders ----------------------------------------------------------------------------------
def test_loaders_registered_with_gem_ids():
    from harness.lib.datasets.data2text import DATA2TEXT

    assert {n: DATASETS.get(n).HUB_ID for n in DATA2TEXT} == {
        "viggo": "GEM/viggo", "e2e_nlg": "GEM/e2e_nlg", "dart": "GEM/dart", "cacapo": "GEM/cacapo"}


@needs_viggo
def test_viggo_local_csv_and_grouping():
    from harness.lib.datasets.data2text import group_by_input

    cls = DATASETS.get("viggo")
    test = cls(cls.Config(path=str(VIGGO), split="test")).load()
    assert len(test) == 1083 and test[0].prompt.startswith(("inform(", "verify_attribute(", "request", "give_opinion",
                                                            "confirm(", "suggest(", "recommend("))
    grouped = group_by_input(test)
    assert len(grouped) < len(test) and all(len(ex.meta["references"]) >= 1 for ex in grouped)
    val = cls(cls.Config(path=str(VIGGO), split="validation"))  # GEM's name for the local valid.csv
    assert len(val.load()) == 714 and "valid.csv" in val.describe_source()


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path.parent


def test_gem_field_mappings(tmp_path):
    """Rows shaped like the GEM hub datasets map to (input, references)."""
    (tmp_path / "e2e").mkdir()
    _jsonl(tmp_path / "e2e" / "test.jsonl", [{"gem_id": "e2e_nlg-test-0", "meaning_representation": "name[Alimentum], area[city centre]",
                                              "target": "Alimentum is in the city centre.",
                                              "references": ["Alimentum is in the city centre.", "Alimentum, city centre."]}])
    e2e = DATASETS.get("e2e_nlg")
    ex = e2e(e2e.Config(path=str(tmp_path / "e2e"), split="test")).load()[0]
    assert ex.prompt == "name[Alimentum], area[city centre]" and ex.response == "Alimentum is in the city centre."
    assert ex.meta["references"] == ["Alimentum is in the city centre.", "Alimentum, city centre."]
    assert ex.meta["id"] == "e2e_nlg-test-0"

    (tmp_path / "dart").mkdir()
    _jsonl(tmp_path / "dart" / "train.jsonl", [
        {"tripleset": [["Mars Hill College", "JOINED", "1973"], ["Mars Hill College", "LOCATION", "Mars Hill, NC"]],
         "target": "Mars Hill College joined in 1973.", "references": []},
        {"tripleset": [["A", "B", "C"]], "annotations": [{"source": "wiki", "text": "A B C."}]}])  # original release
    dart = DATASETS.get("dart")
    rows = dart(dart.Config(path=str(tmp_path / "dart"))).load()
    assert rows[0].prompt == "Mars Hill College | JOINED | 1973 ; Mars Hill College | LOCATION | Mars Hill, NC"
    assert rows[0].response == "Mars Hill College joined in 1973."
    assert rows[1].prompt == "A | B | C" and rows[1].response == "A B C."

    (tmp_path / "cacapo").mkdir()
    _jsonl(tmp_path / "cacapo" / "validation.jsonl", [
        {"lang": "en", "triplets": ["victimAge | 22-year-old", "victimStatus | grazed_in_the_thigh"],
         "target": "A 22-year-old was grazed in the thigh."},
        {"lang": "nl", "triplets": {"subject": ["Ajax"], "property": ["score"], "object": ["2"]}, "target": "Ajax scoorde 2."},
        {"lang": "en", "input": [{"subject": "AEX", "property": "change", "object": "+1%"}], "output": "The AEX rose 1%."}])
    cacapo = DATASETS.get("cacapo")
    allrows = cacapo(cacapo.Config(path=str(tmp_path / "cacapo"), split="validation")).load()
    assert [r.prompt for r in allrows] == ["victimAge | 22-year-old ; victimStatus | grazed_in_the_thigh",
                                           "Ajax | score | 2", "AEX | change | +1%"]
    assert allrows[2].response == "The AEX rose 1%."
    english = cacapo(cacapo.Config(path=str(tmp_path / "cacapo"), split="validation", lang="en")).load()
    assert len(english) == 2


def test_missing_split_and_unreachable_hub_fail_clearly(tmp_path, monkeypatch):
    viggo = DATASETS.get("viggo")
    with pytest.raises(DataError, match="no 'test' split"):
        viggo(viggo.Config(path=str(tmp_path), split="test")).load()
    import harness.lib.datasets.data2text as mod

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(mod, "host_reachable", lambda url, timeout=2.0: False)
    start = time.perf_counter()
    with pytest.raises(DataError, match="unreachable.*GEM/viggo.*path="):
        viggo().load()
    assert time.perf_counter() - start < 5


# ---- pieces -------------------------------------------------------------------------------------
def test_d2t_batch_masks_prompt(tiny):
    from metrics.trainability import d2t_batch

    _, tok = tiny
    b = d2t_batch(tok, ["Meaning representation: a\nDescription:", "MR: bb\nDescription:"], ["x y", "z"], 64, loss_on="response")
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    for i in range(2):
        n = int(b["attention_mask"][i].sum())
        labelled = (b["labels"][i] != -100).nonzero().flatten().tolist()
        assert labelled and labelled[-1] == n - 1 and b["input_ids"][i, n - 1] == tok.eos_token_id
        assert (b["labels"][i, n:] == -100).all()
    everything = d2t_batch(tok, ["p"], ["r"], 64, loss_on="all")
    assert (everything["labels"] == everything["input_ids"]).all()


def test_rouge_takes_best_reference():
    from metrics.trainability import rouge

    r = rouge(["Tetris is an excellent game"], [["Doom is bad", "Tetris is an excellent game"]])
    assert r == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge(["nothing shared"], [["Tetris rocks"]])["rouge1"] == 0.0


def test_config_defaults_and_phases():
    cls = METRICS.get("trainability")
    cfg = cls.Config()
    assert cfg.dataset == "viggo" and cfg.path is None and cfg.samples > 0 and cfg.eval_samples > 0
    assert cls.phases == ("pre_attack",)
    small = cls.Config(samples=32, eval_samples=16, max_new_tokens=32)
    assert (small.samples, small.eval_samples, small.max_new_tokens) == (32, 16, 32)
    with pytest.raises(ValueError):
        cls.Config(dataset="convai9")


# ---- end to end -----------------------------------------------------------------------------------
@needs_viggo
def test_viggo_smoke_shapes_copy_and_determinism(tiny):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev = make(path=str(VIGGO), samples=8, eval_samples=4, max_new_tokens=8, batch_size=4, lr=1e-3, max_length=96)
    ev.check_ready()
    a = ev.evaluate(model, tok, StageContext("pre_attack", seed=5, progress=False))
    json.dumps(a)
    for k in ("rouge1", "rouge2", "rougeL"):
        assert 0.0 <= a[k] <= 1.0
    assert a["train_samples"] == 8 and a["eval_samples"] == 4 and a["train"]["steps"] == 2
    assert len(a["examples"]) == 3 and a["examples"][0]["references"]
    assert "train.csv" in a["train_source"] and "test.csv" in a["eval_source"]
    for k, v in model.state_dict().items():  # the given model is untouched
        assert torch.equal(v, before[k]), k
    b = ev.evaluate(model, tok, StageContext("pre_attack", seed=5, progress=False))
    assert [a[k] for k in ("rouge1", "rouge2", "rougeL")] == [b[k] for k in ("rouge1", "rouge2", "rougeL")]
    assert a["examples"] == b["examples"] and a["train"]["final_loss"] == b["train"]["final_loss"]


def test_fine_tuning_raises_rouge(tiny, toy_dir):
    """Over-fitting four toy rows: ROUGE goes from 0 (random model) to near 1 (it learned the task)."""
    model, tok = tiny
    ev = make(path=str(toy_dir), samples=4, eval_samples=4, max_new_tokens=12, batch_size=4, lr=1e-2, epochs=30,
              scheduler="constant", warmup_ratio=0.0, max_length=64, eval_before=True)
    out = ev.evaluate(model, tok, StageContext("pre_attack", seed=1, progress=False))
    assert out["before"]["rouge1"] < 0.2
    assert out["rouge1"] > 0.6 and out["rougeL"] > 0.6
    assert out["train"]["final_loss"] < out["train"]["first_loss"]


def test_tokenizer_of_the_caller_is_not_modified(tiny):
    from metrics.trainability import greedy_generate

    model, tok = tiny
    tok.pad_token = None
    side = tok.padding_side
    greedy_generate(model, tok, ["a", "bb cc"], max_new_tokens=2, batch_size=2, device=torch.device("cpu"))
    assert tok.pad_token is None and tok.padding_side == side
