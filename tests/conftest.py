import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("HARNESS_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: use --runslow or HARNESS_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny random Llama + tokenizer folder (shared by the session; do not modify)."""
    from harness.tiny import build_tiny

    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny(folder, arch="llama")
    return folder


@pytest.fixture
def tiny(tiny_dir):
    """A fresh (model, tokenizer) loaded from the tiny folder; free to modify."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
