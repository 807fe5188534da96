import logging
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
    from harness.lib.tiny import build_tiny

    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny(folder, arch="llama")
    return folder


@pytest.fixture
def tiny(tiny_dir):
    """A fresh (model, tokenizer) loaded from the tiny folder; free to modify."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(autouse=True)
def restore_logging():
    """``harness.cli.main`` re-installs the root log handlers on the (captured) stderr of the test;
    put the previous ones back so later tests do not log into a closed stream."""
    root = logging.getLogger()
    # an earlier test's main() may have left a handler on a captured stream that is closed now
    root.handlers[:] = [h for h in root.handlers if not (type(h) is logging.StreamHandler
                                                         and getattr(h.stream, "closed", False))]
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
