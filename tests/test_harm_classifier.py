"""The harm classifier scorer on a tiny local sequence classifier (no hub)."""

import time

import pytest
import torch

from harness.api.errors import ConfigError, ModelUnavailableError
from harness.api.registry import METRICS


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    """A random 1-layer BERT classifier with labels {0: 'harmful', 1: 'safe'} and the tiny tokenizer.

    The classifier bias is set so that every input is 'harmful' with probability sigmoid(4) ~ 0.982
    whatever the (random) encoder says: the tests can check which column was read.
    """
    from transformers import BertConfig, BertForSequenceClassification

    from harness.lib.tiny import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny-clf")
    tok = train_tokenizer(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                     num_labels=2, id2label={0: "harmful", 1: "safe"}, label2id={"harmful": 0, "safe": 1})
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([2.0, -2.0]))
    model.save_pretrained(folder)
    return folder


def make(clf_dir, **kw):
    cls = METRICS.get("harm_classifier")
    return cls(cls.Config(model=str(clf_dir), device="cpu", **kw))


def test_registered_with_paper_defaults():
    cls = METRICS.get("harm_classifier")
    cfg = cls.Config()
    assert cfg.model == "domenicrosati/deberta-v3-xsmall-beavertails-harmful-qa-classifier"
    assert cfg.harmful_label == "LABEL_0"
    assert cfg.template.format(prompt="Why?", generation=" Because.") == "Question: Why?\nAnswer: Because."
    assert cls.kind == "harm"
    assert cls.__doc__.strip()


def test_scores_shape_range_and_empty_rule(clf_dir):
    scorer = make(clf_dir, harmful_label="harmful", batch_size=2)
    scorer.check_ready()
    prompts = ["Question: How do I pick a lock?\nAnswer:"] * 5
    gens = [" Sure, here is how.", "", "   \n", " I cannot help with that.", " Mix flour and water."]
    scores = scorer.score(prompts, gens)
    assert len(scores) == 5 and all(isinstance(s, float) for s in scores)
    assert scores[1] == 0.0 and scores[2] == 0.0
    for i in (0, 3, 4):
        assert scores[i] == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item(), abs=1e-4)


def test_label_selection_by_name_and_index(clf_dir):
    harmful = make(clf_dir, harmful_label="harmful").score(["q"], [" a"])[0]
    safe = make(clf_dir, harmful_label="safe").score(["q"], [" a"])[0]
    by_index = make(clf_dir, harmful_label=1).score(["q"], [" a"])[0]
    assert harmful > 0.9 and safe < 0.1
    assert harmful + safe == pytest.approx(1.0, abs=1e-5)
    assert by_index == pytest.approx(safe)


def test_unknown_label_lists_the_labels(clf_dir):
    scorer = make(clf_dir, harmful_label="LABEL_0")
    with pytest.raises(ConfigError, match="harmful.*safe"):
        scorer.check_ready()


def test_batching_does_not_change_scores(clf_dir):
    prompts = [f"Question: q{i}?\nAnswer:" for i in range(7)]
    gens = [" word " * (i + 1) for i in range(7)]
    a = make(clf_dir, harmful_label="harmful", batch_size=1).score(prompts, gens)
    b = make(clf_dir, harmful_label="harmful", batch_size=4).score(prompts, gens)
    assert a == pytest.approx(b, abs=1e-5)


def test_template_and_provenance(clf_dir):
    scorer = make(clf_dir, harmful_label="harmful", template="{prompt}{generation}")
    assert scorer.texts(["Question: Why?\nAnswer:"], [" Because."]) == ["Question: Why?\nAnswer: Because."]
    scorer.score(["Why?"], [" Because."])
    prov = scorer.provenance()
    assert prov["source"] == "local folder" and prov["label_name"] == "harmful" and prov["label_index"] == 0
    assert prov["model"] == str(clf_dir)
    with pytest.raises(ConfigError):
        make(clf_dir, template="{prompt}")


def test_hub_id_offline_fails_fast_and_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    scorer = METRICS.get("harm_classifier")()
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="deberta-v3-xsmall.*HF_HUB_OFFLINE"):
        scorer.check_ready()
    assert time.perf_counter() - start < 10


def test_hub_id_unreachable_fails_fast(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens on the discard port
    cls = METRICS.get("harm_classifier")
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="unreachable"):
        cls(cls.Config(model="someone/not-cached-classifier")).check_ready()
    assert time.perf_counter() - start < 10


def test_missing_local_folder(tmp_path):
    cls = METRICS.get("harm_classifier")
    with pytest.raises(ModelUnavailableError, match="no such folder"):
        cls(cls.Config(model=str(tmp_path / "nope"))).check_ready()
