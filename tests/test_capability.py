"""The capability evaluation: lm-eval on the in-memory tiny model with local tasks (no hub)."""

import json
import re
from pathlib import Path

import pytest
import torch

from harness.lib.context import StageContext
from harness.api.errors import ConfigError
from harness.api.registry import METRICS

TASKS_DIR = Path(__file__).parent / "fixtures" / "lm_eval_tasks"


def make(**kw):
    cls = METRICS.get("capability")
    params = dict(include_path=str(TASKS_DIR), include_defaults=False, batch_size=4, bootstrap_iters=100)
    params.update(kw)
    return cls(cls.Config(**params))


def test_default_tasks_are_lm_eval_0_4_names():
    """The paper's task list exists in the installed lm-eval (checked on its YAML files, fast)."""
    import lm_eval

    cls = METRICS.get("capability")
    tasks = cls.Config().tasks
    assert tasks == ["truthfulqa_mc2", "mmlu", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                     "ethics_cm_parquet", "crows_pairs_english"]  # ethics_cm on parquet: bundled (datasets >= 4)
    root = Path(lm_eval.__file__).parent / "tasks"
    names = set()
    for path in [*root.rglob("*.yaml"), *__import__("metrics.capability").capability.BUNDLED_TASKS.glob("*.yaml")]:
        names.update(re.findall(r"^(?:task|group):\s*([\w\-]+)\s*$", path.read_text(errors="ignore"), re.M))
    missing = [t for t in tasks if t not in names]
    assert not missing, missing


def test_config_validation():
    cls = METRICS.get("capability")
    assert cls.Config(tasks="arc_easy, hellaswag").tasks == ["arc_easy", "hellaswag"]
    assert cls.Config(batch_size="auto").batch_size == "auto"
    with pytest.raises(ValueError):
        cls.Config(batch_size="fast")
    with pytest.raises(ValueError):
        cls.Config(tasks=[])
    with pytest.raises(ValueError):
        cls.Config(limit=0)


def test_check_ready_rejects_unknown_tasks():
    make(tasks=["tiny_qa", "tiny_group"]).check_ready()
    with pytest.raises(ConfigError, match="tiny_qaa.*did you mean tiny_qa"):
        make(tasks=["tiny_qaa"]).check_ready()
    with pytest.raises(ConfigError, match="not a folder"):
        make(include_path="/nonexistent/tasks").check_ready()


def test_evaluates_in_memory_model_with_stderr(tiny):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    side = tok.padding_side
    out = make(tasks=["tiny_qa", "tiny_pairs"]).evaluate(model, tok, StageContext("pre_attack", seed=3))
    json.dumps(out)  # JSON-serialisable, no NaN objects
    assert set(out["tasks"]) == {"tiny_qa", "tiny_pairs"}
    qa = out["tasks"]["tiny_qa"]
    assert qa["metric"] == "acc" and 0.0 <= qa["score"] <= 1.0 and qa["score"] == qa["acc"]
    assert qa["acc_stderr"] > 0 and "acc_norm_stderr" in qa and qa["n"] == 5 and qa["higher_is_better"] is True
    assert out["n_shot"]["tiny_qa"] == 0 and out["lm_eval_version"]
    # the model is evaluated in place, not modified; its train/eval mode and the tokenizer are kept
    assert model.training and tok.padding_side == side
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_groups_limit_and_subtasks(tiny):
    model, tok = tiny
    out = make(tasks=["tiny_group"], limit=3).evaluate(model, tok, StageContext("post_attack"))
    group = out["tasks"]["tiny_group"]
    assert group["group"] is True and group["metric"] == "acc" and group["n"] == 6
    assert isinstance(group["acc_stderr"], float)
    assert set(out["subtasks"]) == {"tiny_qa", "tiny_pairs"}
    assert all(row["n"] == 3 for row in out["subtasks"].values())
    expected = (out["subtasks"]["tiny_qa"]["acc"] + out["subtasks"]["tiny_pairs"]["acc"]) / 2
    assert group["score"] == pytest.approx(expected)


def test_summarize_handles_filters_and_missing_stderr():
    from metrics.capability import summarize

    res = {"results": {"gsm": {"alias": "gsm", "exact_match,strict-match": 0.25,
                               "exact_match_stderr,strict-match": "N/A"},
                       "crows_pairs_english": {"likelihood_diff,none": 3.2, "likelihood_diff_stderr,none": 0.1,
                                               "pct_stereotype,none": 0.6, "pct_stereotype_stderr,none": 0.01}},
           "n-samples": {"gsm": {"original": 10, "effective": 4}},
           "higher_is_better": {"crows_pairs_english": {"pct_stereotype": False}}}
    out = summarize(res)
    gsm = out["tasks"]["gsm"]
    assert gsm["metric"] == "exact_match/strict-match" and gsm["score"] == 0.25 and gsm["n"] == 4
    assert gsm["exact_match_stderr/strict-match"] is None
    crows = out["tasks"]["crows_pairs_english"]
    assert crows["metric"] == "pct_stereotype" and crows["higher_is_better"] is False


@pytest.mark.slow
def test_default_task_names_resolve_in_task_manager():
    """check_ready() with the paper's tasks indexes all of lm-eval's tasks (several seconds)."""
    METRICS.get("capability")().check_ready()
