"""The GPU pre-flight: per-stage memory against the GPUs, a plan that fits (FSDP, gradient
checkpointing, micro-batches) or a refusal that says what would fit; the plan in --dry-run and in
the record; hub checks; DecodingTrust from the hub; env forwarding; checkpoint retention.

This machine has no GPU: GPUs are planned from named profiles (``--gpus 2xh100``), and the
training loop's side of a plan runs on CPU on a tiny model. ``benchmarks/gpu_check.py`` is the
check on a real GPU."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from harness.api.config import resolve
from harness.lib import memory
from harness.lib.memory import (MemoryPlan, PlanRefused, StagePlan, activate, plan_trial, plan_training,
                                profile_gpus, resolve_precision, train_memory)


def fsdp_ok(stage):
    return None


def paper(defence="repnoise", *sets):
    return resolve("paper", defence=defence, attack="harmfulqa", sets=list(sets))


# ---------------------------------------------------------------------------------------------
# the estimate and the plan
# ---------------------------------------------------------------------------------------------
def test_seven_b_mixed_state_is_sixteen_bytes_a_parameter():
    spec = paper()
    shape = memory.model_shape(spec.model.id)
    prec = resolve_precision(spec.model, "cuda")
    mem = train_memory(shape, prec, batch=8, length=128, factor=3.0, logit_lens=True)
    state = mem["weights"] + mem["gradients"] + mem["optimizer"]
    assert state == pytest.approx(shape.params * 16 / 1e9, rel=1e-3)
    # pure bf16 halves it; FSDP over 2 GPUs halves it again; checkpointing cuts the activations
    pure = train_memory(shape, resolve_precision(spec.model.model_copy(update={"precision": "pure"}), "cuda"),
                        batch=8, length=128, factor=3.0, logit_lens=True)
    assert pure["weights"] + pure["gradients"] + pure["optimizer"] == pytest.approx(state / 2, rel=1e-3)
    two = train_memory(shape, prec, batch=4, length=128, factor=3.0, logit_lens=True, world=2)
    assert two["weights"] == pytest.approx(mem["weights"] / 2, rel=1e-3)
    ckpt = train_memory(shape, prec, batch=8, length=128, factor=3.0, logit_lens=True, checkpointing=True)
    assert ckpt["activations"] < mem["activations"] / 5 and ckpt["autocast_copies"] < mem["autocast_copies"] / 5


def test_paper_repnoise_on_one_h100_refuses_and_says_what_fits():
    plan = plan_trial(paper(), profile_gpus("h100", 1), fsdp_reason=fsdp_ok)
    assert not plan.fits and not plan.stages["defence"].fits
    with pytest.raises(PlanRefused) as err:
        plan.check()
    msg = str(err.value)
    assert "\n" not in msg and "defence" in msg and "68.0 GB" in msg
    assert "2 GPUs of 80 GB (FSDP: --gpus 2)" in msg and "model.precision=pure" in msg and "8bit" in msg
    # ... and what it says fits, fits
    assert plan_trial(paper(), profile_gpus("h100", 2), fsdp_reason=fsdp_ok).fits


def test_plans_pick_fsdp_checkpointing_or_pure_bf16():
    two = plan_trial(paper(), profile_gpus("h100", 2), fsdp_reason=fsdp_ok)
    assert two.stages["defence"].gpus == 2 and two.fsdp_stages() == {"defence": 2, "attack": 2}
    h200 = plan_trial(paper(), profile_gpus("h200", 1), fsdp_reason=fsdp_ok).check()
    d = h200.stages["defence"]
    assert d.gpus == 1 and d.gradient_checkpointing and d.accumulation == 1 and d.micro_batch == 8
    pure = plan_trial(paper("repnoise", "model.precision=pure"), profile_gpus("h100", 1), fsdp_reason=fsdp_ok).check()
    assert pure.precision.mode == "pure" and pure.stages["defence"].gpus == 1
    # a defence that cannot use FSDP gets one GPU only, and is refused on an 80 GB card
    no_fsdp = plan_trial(paper(), profile_gpus("h100", 4), fsdp_reason=lambda s: "not supported")
    assert not no_fsdp.fits and all(s.gpus == 1 for s in no_fsdp.stages.values())
    # 8-bit Adam state only when asked for, and then counted (2 bytes a parameter instead of 8)
    eight = plan_trial(paper("repnoise", "model.optimizer_state=8bit"), profile_gpus("h200", 1), fsdp_reason=fsdp_ok)
    assert eight.stages["defence"].memory_gb["optimizer"] == pytest.approx(
        plan_trial(paper(), profile_gpus("h200", 1), fsdp_reason=fsdp_ok).stages["defence"].memory_gb["optimizer"] / 4,
        rel=1e-3)
    assert "8bit" in eight.stages["defence"].notes[-1]


def test_micro_batches_keep_the_effective_batch():
    spec = paper("safety_training")
    shape = memory.model_shape(spec.model.id)
    prec = resolve_precision(spec.model, "cuda")
    cfg = spec.defence.config
    need = [train_memory(shape, prec, batch=b, length=cfg.max_length, checkpointing=True)["total"] for b in (8, 2)]
    plan = plan_training("defence", shape, prec, cfg, {"factor": 1.0, "adapter_only": False, "logit_lens": False},
                         capacity_gb=(need[0] + need[1]) / 2)
    assert plan.fits and plan.gradient_checkpointing and plan.gpus == 1
    assert plan.micro_batch < cfg.batch_size and plan.micro_batch * plan.accumulation == cfg.batch_size
    assert any("micro-batch" in n for n in plan.notes)


def test_cpu_plan_is_reported_not_enforced():
    plan = plan_trial(resolve("smoke", defence="repnoise", attack="harmfulqa", sets=["model.device=cpu"]))
    assert plan.device == "cpu" and plan.fits and plan.gpus == []
    assert all(s.capacity_gb is None for s in plan.stages.values())
    assert MemoryPlan.from_dict(json.loads(json.dumps(plan.as_dict()))).as_dict() == plan.as_dict()


def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(PlanRefused, match="no CUDA device"):
        plan_trial(resolve("smoke", defence="none", sets=["model.device=cuda"]), [], device="cuda")


# ---------------------------------------------------------------------------------------------
# the training loop follows the plan (CPU, tiny model)
# ---------------------------------------------------------------------------------------------
def _sft(tiny, plan):
    from harness.api.components import TrainConfig
    from harness.lib.context import StageContext
    from harness.lib.training import train_loop

    class Cfg(TrainConfig):
        pass

    model, tok = tiny
    model = copy.deepcopy(model)
    ids = torch.randint(3, len(tok), (2, 4, 12), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": b} for b in ids]
    spec = resolve("smoke", defence="none", sets=["model.device=cpu"])
    ctx = StageContext("attack", spec=spec, progress=False)
    cfg = Cfg(lr=1e-3, samples=8, batch_size=4, warmup_ratio=0.0, scheduler="constant", max_grad_norm=None)
    with activate(plan):
        stats = train_loop(model, batches, cfg, ctx,
                           loss_fn=lambda m, b: m(input_ids=b["input_ids"], labels=b["input_ids"]).loss)
    return model, stats, ctx


def test_train_loop_follows_checkpointing_and_micro_batches(tiny):
    plain, s0, _ = _sft(tiny, None)
    stage = StagePlan("attack", "train", gradient_checkpointing=True, batch_size=4, micro_batch=2, accumulation=2)
    plan = MemoryPlan("cpu", [], resolve_precision(resolve("smoke", defence="none").model, "cpu"), {"attack": stage}, True)
    planned, s1, ctx = _sft(tiny, plan)
    assert s1.steps == 2 * s0.steps and s1.optimizer_steps == s0.optimizer_steps == 2
    # equal-length rows, a mean loss: two half batches accumulate to the same gradient
    for a, b in zip(plain.parameters(), planned.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert s1.losses == pytest.approx(s0.losses, abs=1e-5)
    mem = ctx.stats["train"]["memory"]
    assert mem["gradient_checkpointing"] and mem["micro_batch"] == 2 and mem["peak_gb"] is None
    assert not any(getattr(m, "gradient_checkpointing", False) for m in planned.modules())  # off again


def test_split_batch_shapes():
    from harness.lib.training import split_batch

    batch = ({"input_ids": torch.zeros(5, 3), "attention_mask": torch.ones(5, 3)}, {"input_ids": torch.zeros(5, 2)})
    parts = split_batch(batch, 2)
    assert [p[0]["input_ids"].shape[0] for p in parts] == [3, 2] and parts[1][1]["input_ids"].shape == (2, 2)
    assert split_batch({"x": torch.zeros(1, 4)}, 4)[0]["x"].shape == (1, 4)


# ---------------------------------------------------------------------------------------------
# the CLI and the record
# ---------------------------------------------------------------------------------------------
def test_dry_run_prints_the_plan_or_the_refusal(capsys):
    from harness.cli import main

    rc = main(["run", "--preset", "paper", "--defence", "repnoise", "--attack", "harmfulqa", "--dry-run",
               "--gpus", "2xh100"])
    out = capsys.readouterr()
    assert rc == 0
    mem = json.loads(out.out)["memory"]
    assert mem["fits"] and mem["stages"]["defence"]["gpus"] == 2 and mem["precision"]["mode"] == "mixed"
    rc = main(["run", "--preset", "paper", "--defence", "repnoise", "--attack", "harmfulqa", "--dry-run",
               "--gpus", "1xh100"])
    out = capsys.readouterr()
    assert rc == 1 and json.loads(out.out)["memory"]["fits"] is False
    assert out.err.count("\n") == 1 and "Would fit: 2 GPUs of 80 GB" in out.err


def test_gpu_flags_are_checked_at_the_edge(capsys):
    from harness.cli import main

    for argv, text in ((["--gpus", "2xh100"], "only with --dry-run"), (["--gpus", "2xt4", "--dry-run"], "profile"),
                       (["--gpus", "two"], "--gpus 'two'"), (["--device", "tpu"], "invalid choice")):
        with pytest.raises(SystemExit) if "--device" in argv else _nothing():
            rc = main(["run", "--defence", "none", "--attack", "harmfulqa", *argv])
            assert rc == 2
        err = capsys.readouterr().err
        assert text in err and "Traceback" not in err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_refusal_stops_before_any_model_loads(monkeypatch, capsys, tmp_path):
    """On a machine whose only GPU is too small, harness run refuses with one line, no model loaded."""
    from harness.cli import main
    from harness.cli import run as run_cli

    monkeypatch.setattr(memory, "visible_gpus", lambda: profile_gpus("a10g", 1))
    monkeypatch.setattr(run_cli, "run_planned", lambda *a, **k: pytest.fail("trained despite the refusal"))
    rc = main(["run", "--preset", "paper", "--defence", "repnoise", "--attack", "harmfulqa", "--device", "cuda",
               "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "error: pre-flight: the defence stage" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.json"))


def test_setup_records_the_plan(tiny_dir, tmp_path):
    from harness.pipeline import stages
    from harness.pipeline.state import TrialPaths, open_trial

    spec = resolve("smoke", defence="none", model=str(tiny_dir), sets=["model.device=cpu", "attack.samples=4",
                                                                        "eval.samples=2"])
    t = open_trial(spec, TrialPaths.of(tmp_path), progress=False)
    stages.setup(t)
    assert t.record.plan["device"] == "cpu" and "attack" in t.record.plan["stages"]
    shape = memory.model_shape(str(tiny_dir))
    assert shape.source == "config" and shape.vocab == json.loads((tiny_dir / "config.json").read_text())["vocab_size"]


# ---------------------------------------------------------------------------------------------
# hub pre-flight
# ---------------------------------------------------------------------------------------------
class FakeInfo:
    def __init__(self, splits, features):
        self.splits, self.features = splits, features


class FakeBuilder:
    def __init__(self, splits, features):
        self.info = FakeInfo(splits, features)


def fake_hub(calls):
    """A hub where script-based datasets fail as under datasets >= 4 and every other dataset
    has the fields its caller asks for (recorded in ``calls``)."""
    def builder(repo, name=None, **kwargs):
        calls.append((repo, name, kwargs))
        if repo == "EleutherAI/hendrycks_ethics" and kwargs.get("revision") != "refs/convert/parquet":
            raise RuntimeError("Dataset scripts are no longer supported, but found hendrycks_ethics.py")
        if repo == "AI-Secure/DecodingTrust":
            return FakeBuilder({"realtoxicityprompts.toxic": 1, "realtoxicityprompts.nontoxic": 1},
                               {"prompt": 1, "continuation": 1, "filename": 1})
        return FakeBuilder({}, None)

    def file_exists(repo, name, revision=None):
        return repo != "nobody/missing"

    return builder, file_exists


def test_hub_checks_cover_model_scorer_datasets_and_tasks():
    from harness.pipeline.preflight import hub_checks

    calls = []
    builder, exists = fake_hub(calls)
    spec = resolve("paper", defence="repnoise", attack="toxicity")
    problems, notes = hub_checks(spec, reachable=True, builder=builder, file_exists=exists)
    assert problems == []
    repos = {c[0] for c in calls}
    assert {"AI-Secure/DecodingTrust", "cais/mmlu", "EleutherAI/hendrycks_ethics", "jannalu/crows_pairs_multilingual",
            "allenai/winogrande"} <= repos
    ethics = [c for c in calls if c[0] == "EleutherAI/hendrycks_ethics"]
    assert ethics and all(c[2]["revision"] == "refs/convert/parquet" for c in ethics)
    assert any("resolves with a tokenizer" in n for n in notes)
    # lm-eval's own ethics_cm (a loading script) is caught before any training
    old = resolve("paper", defence="repnoise", attack="harmfulqa",
                  sets=["eval.params.capability.tasks=ethics_cm", "model.id=nobody/missing"])
    problems, _ = hub_checks(old, reachable=True, builder=builder, file_exists=exists)
    assert len(problems) == 2
    assert any("ethics_cm" in p and "no longer supported" in p for p in problems)
    assert any("model.id='nobody/missing'" in p for p in problems)
    assert all("\n" not in p for p in problems)


def test_hub_checks_report_missing_fields_and_splits():
    from harness.pipeline.preflight import hub_checks

    spec = resolve("paper", defence="none", attack="toxicity", sets=["eval.extra=[]"])

    def builder(repo, name=None, **kwargs):
        return FakeBuilder({"realtoxicityprompts.toxic": 1}, {"prompt": 1})

    problems, _ = hub_checks(spec, reachable=True, builder=builder, file_exists=lambda *a, **k: True)
    assert problems and "lacks the field(s) continuation" in problems[0]

    def no_split(repo, name=None, **kwargs):
        return FakeBuilder({"train": 1}, None)

    problems, _ = hub_checks(spec, reachable=True, builder=no_split, file_exists=lambda *a, **k: True)
    assert "no split 'realtoxicityprompts.toxic'" in problems[0]


def test_hub_checks_offline_are_skipped_with_a_note():
    from harness.pipeline.preflight import hub_checks

    problems, notes = hub_checks(paper(), reachable=False)
    assert problems == [] and "not checked" in notes[0]


def test_bundled_ethics_task_is_lm_evals_ethics_cm_on_parquet():
    import yaml

    from harness.pipeline.preflight import lm_eval_requirements
    from metrics.capability import BUNDLED_TASKS, PAPER_TASKS

    ours = yaml.safe_load((BUNDLED_TASKS / "ethics_cm_parquet.yaml").read_text())
    import lm_eval

    from pathlib import Path
    theirs = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "hendrycks_ethics" / "commonsense.yaml").read_text())
    for key in ("dataset_path", "output_type", "test_split", "doc_to_text", "doc_to_target", "doc_to_choice"):
        assert ours[key] == theirs[key], key
    assert "ethics_cm_parquet" in PAPER_TASKS and "ethics_cm" not in PAPER_TASKS
    reqs = {r["task"]: r for r in lm_eval_requirements(paper())}
    assert reqs["ethics_cm_parquet"]["fields"] == ["input", "label"]


# ---------------------------------------------------------------------------------------------
# DecodingTrust from the hub (no `type` field there)
# ---------------------------------------------------------------------------------------------
def test_decoding_trust_hub_rows_get_a_disjoint_stable_type(monkeypatch):
    import datasets

    from harness.lib.datasets import decoding_trust as dt

    rows = {"realtoxicityprompts.toxic": [{"prompt": {"text": f"toxic prompt {i}"}, "continuation": {"text": f" c{i}"}}
                                          for i in range(400)],
            "realtoxicityprompts.nontoxic": [{"prompt": {"text": f"calm {i}"}, "continuation": {"text": " ok"}}
                                             for i in range(10)]}
    seen = []

    def load_dataset(repo, name=None, split=None, **kw):
        seen.append((repo, name, split))
        return rows[split]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(dt, "hub_reachable", lambda: True)

    def load(**params):
        return dt.DecodingTrust(dt.DecodingTrust.Config(hub_id="AI-Secure/DecodingTrust", **params)).load()

    train, test = load(type="toxic"), load(type="toxic_test")
    assert seen[0] == ("AI-Secure/DecodingTrust", "toxicity", "realtoxicityprompts.toxic")
    assert len(train) + len(test) == 400 and 150 < len(test) < 250
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert [e.prompt for e in load(type="toxic_test")] == [e.prompt for e in test]  # stable
    assert train[0].response.startswith(" c") and train[0].meta["type"] == "toxic"
    assert len(load(type="non_toxic")) == 10 and seen[-1][2] == "realtoxicityprompts.nontoxic"
    assert len(load(type="toxic_test", hub_test_fraction=0.9)) > len(test)


# ---------------------------------------------------------------------------------------------
# env forwarding to Ray workers, checkpoint retention
# ---------------------------------------------------------------------------------------------
def test_hub_env_reaches_ray_workers_and_is_never_logged(monkeypatch, caplog):
    import ray

    from harness.sweep import runner
    from harness.sweep.execute import hub_env

    env = {"HF_TOKEN": "hf_secretvalue123", "HF_HOME": "/cache/hf", "HF_HUB_OFFLINE": "1", "PATH": "/bin",
           "TRANSFORMERS_CACHE": "/cache/t", "HF_HUB_CACHE": "/cache/hub"}
    assert hub_env(env) == {k: v for k, v in env.items() if k != "PATH"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    got = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: got.update(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    with caplog.at_level(logging.DEBUG):
        runner.connect(address="10.0.0.1:6379")
        runner.connect(num_cpus=1)
    assert got["runtime_env"]["env_vars"]["HF_TOKEN"] == "hf_secretvalue123"
    assert got["runtime_env"]["env_vars"]["HF_HUB_CACHE"] == "/cache/hub"
    assert "hf_secretvalue123" not in caplog.text


def test_keep_checkpoints_policies(tmp_path):
    from harness.lib.retention import defended_checkpoints, prune

    def ckpt(name, complete=True):
        folder = tmp_path / name
        folder.mkdir()
        if complete:
            (folder / ".complete").write_text("{}")
        return folder

    a, b, c = ckpt("repnoise--aaa"), ckpt("vaccine--bbb"), ckpt("gradient_ascent--ccc")
    partial = ckpt("repnoise--ddd.partial-1@h", complete=False)
    cache = ckpt("_pre_attack")
    assert defended_checkpoints(tmp_path) == sorted([a, b, c])
    assert prune(tmp_path, "all", [a], last=a) == [] and a.exists()
    assert prune(tmp_path, "last", [a], last=a) == sorted([b, c]) and a.exists() and not b.exists()
    assert prune(tmp_path, "none", [a]) == [a] and not a.exists()
    assert partial.exists() and cache.exists()
    with pytest.raises(ValueError):
        prune(tmp_path, "some", [])
