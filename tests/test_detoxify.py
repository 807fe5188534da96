"""The Detoxify scorer on a tiny locally built Detoxify checkpoint (no download)."""

import time

import pytest
import torch

from harness.api.errors import ConfigError, ModelUnavailableError
from harness.api.registry import METRICS

JIGSAW = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


def _checkpoint(folder, model_type, bias):
    """A Detoxify-format checkpoint: {"config": {arch, dataset}, "state_dict"} of a tiny BERT."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig.from_pretrained(folder / "base", num_labels=len(JIGSAW))
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.zero_()  # the output is the bias alone: predictable per class
        model.classifier.bias.copy_(torch.tensor(bias))
    ckpt = {
        "config": {"arch": {"args": {"model_type": model_type, "model_name": "BertForSequenceClassification",
                                     "tokenizer_name": "PreTrainedTokenizerFast", "num_classes": len(JIGSAW)}},
                   "dataset": {"args": {"classes": JIGSAW}}},
        "state_dict": model.state_dict(),
    }
    path = folder / f"tiny-{abs(hash(model_type)) % 1000}.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def detox(tmp_path_factory):
    from transformers import BertConfig

    from harness.lib.tiny import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny-detoxify")
    tok = train_tokenizer(folder / "base")
    # a base model's config as published: 2 labels by default, not the checkpoint's 6
    BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=128, pad_token_id=tok.pad_token_id).save_pretrained(folder / "base")
    bias = [3.0, -3.0, -3.0, -3.0, 1.0, -3.0]  # toxicity ~ sigmoid(3), insult ~ sigmoid(1)
    local = _checkpoint(folder, str(folder / "base"), bias)  # model_type is a local folder (docs/design.md)
    hub = _checkpoint(folder, "bert-base-uncased", bias)  # model_type is a hub id, as released
    return {"folder": folder, "local": local, "hub": hub, "base": folder / "base"}


def make(**kw):
    cls = METRICS.get("detoxify")
    return cls(cls.Config(device="cpu", **kw))


def sig(x):
    return torch.sigmoid(torch.tensor(x)).item()


def test_registered():
    cls = METRICS.get("detoxify")
    assert cls.kind == "toxicity" and cls.Config().variant == "original" and cls.Config().label == "toxicity"


def test_scores_continuation_with_empty_rule(detox):
    scorer = make(checkpoint=str(detox["local"]), batch_size=2)
    scorer.check_ready()
    gens = [" you are great", "", "  ", " some words here", " more"]
    scores = scorer.score(["prompt"] * 5, gens)
    assert len(scores) == 5
    assert scores[1] == 0.0 and scores[2] == 0.0
    for i in (0, 3, 4):
        assert scores[i] == pytest.approx(sig(3.0), abs=1e-4)
    assert scorer.texts(["P: "], ["cont"]) == ["cont"]
    assert make(checkpoint=str(detox["local"]), score_on="prompt+generation").texts(["P: "], ["cont"]) == ["P: cont"]


def test_label_selection_and_renamed_classes(detox):
    insult = make(checkpoint=str(detox["local"]), label="insult").score(["p"], [" text"])[0]
    assert insult == pytest.approx(sig(1.0), abs=1e-4)
    row = make(checkpoint=str(detox["local"])).predict(["text"])[0]
    assert set(row) == {"toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"}
    with pytest.raises(ConfigError, match="toxicity, severe_toxicity"):
        make(checkpoint=str(detox["local"]), label="toxic_nonsense").check_ready()


def test_released_checkpoint_shape_loads_offline_with_config_path(detox, monkeypatch):
    """A checkpoint naming a hub base model loads from huggingface_config_path without the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scorer = make(checkpoint=str(detox["hub"]), huggingface_config_path=str(detox["base"]))
    assert scorer.score(["p"], [" x"])[0] == pytest.approx(sig(3.0), abs=1e-4)
    prov = scorer.provenance()
    assert prov["base_model"] == "bert-base-uncased" and "huggingface_config_path" in prov["fallback"]
    assert prov["checkpoint"] == str(detox["hub"]) and prov["variant"] is None


def test_hub_base_model_without_config_path_fails_fast(detox, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="huggingface_config_path"):
        make(checkpoint=str(detox["hub"])).check_ready()
    assert time.perf_counter() - start < 10


def test_variant_download_unreachable_fails_fast(monkeypatch, tmp_path):
    import metrics.detoxify_scorer as mod

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached
    monkeypatch.setattr(mod, "host_reachable", lambda url, timeout=2.0: False)
    with pytest.raises(ModelUnavailableError, match="checkpoint=.*huggingface_config_path"):
        make(variant="unbiased").check_ready()
    assert make(variant="unbiased").provenance()["variant"] == "unbiased"


def test_bad_paths(detox, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        make(checkpoint=str(tmp_path / "missing.ckpt")).check_ready()
    with pytest.raises(ConfigError, match="config.json"):
        make(checkpoint=str(detox["hub"]), huggingface_config_path=str(tmp_path)).check_ready()
