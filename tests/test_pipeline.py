"""The trial's stages are written once (``harness.pipeline.stages.STAGES``): ``harness run``, the
sweep's DAG and its Ray tasks all follow that list, and a cell gives the same record either way.
Base models are loaded only when a stage needs one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import sweep_support
from harness.api.config import resolve
from harness.api.record import TrialRecord
from harness.pipeline import stages
from harness.pipeline.trial import run_trial
from harness.sweep.dag import build
from harness.sweep.grid import SweepSpec

NAMES = ["setup", "data", "base_extras", "defence", "pre_attack", "attack", "post_attack", "finish"]


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def local_sets(tmp_path):
    """Settings of a tiny cell on local data that carries answers and refusals (nothing is
    synthesised, so no cache bookkeeping differs between runs) with a defence that really trains."""
    d = _jsonl(tmp_path / "defence.jsonl", [{"prompt": f"how to do bad thing {i}", "response": f"do it so {i}",
                                             "refusal": "I cannot help with that."} for i in range(8)])
    a = _jsonl(tmp_path / "attack.jsonl", [{"prompt": f"question number {i}", "response": f"here it is {i}"}
                                           for i in range(14)])
    return {**sweep_support.FAST_SETS, "defence.dataset": {"name": "local", "path": d}, "defence.samples": 8,
            "attack.dataset": {"name": "local", "path": a}, "attack.eval_dataset": {"name": "local", "path": a}}


def _spy(calls: list[str]):
    def wrap(stage):
        def run(t):
            calls.append(stage.name)
            return stage.run(t)
        return dataclasses.replace(stage, run=run)
    return wrap


# ---- one list ------------------------------------------------------------------------------------
def test_stage_list_is_the_single_source(tiny_dir, tmp_path, monkeypatch, local_sets):
    assert [s.name for s in stages.STAGES] == NAMES
    assert stages.task_kinds() == ("data", "base", "defence", "pre_attack", "attack", "cell")
    assert [s.name for s in stages.stages_for_task("cell")] == NAMES  # the cell's task is the whole trial
    assert [s.name for s in stages.stages_for_task("pre_attack")] == ["setup", "data", "defence", "pre_attack"]
    assert [s.name for s in stages.stages_for_task("attack")] == ["setup", "data", "defence", "attack"]
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    sets = [f"{k}={json.dumps(v)}" for k, v in local_sets.items()]
    spec = resolve("smoke", defence=sweep_support.SFT_NAME, model=str(tiny_dir), sets=sets)

    # run_trial runs exactly the list, in its order
    calls: list[str] = []
    original = stages.STAGES
    monkeypatch.setattr(stages, "STAGES", tuple(map(_spy(calls), original)))
    assert run_trial(spec, tmp_path / "a", progress=False).status == "ok"
    assert calls == NAMES

    # change the list: no base-model extras, and pre-attack scores computed in the cell's own task
    changed = tuple(dataclasses.replace(s, task="cell") if s.name == "pre_attack" else
                    dataclasses.replace(s, needs=("pre_attack", "post_attack")) if s.name == "finish" else s
                    for s in original if s.name != "base_extras")
    calls.clear()
    monkeypatch.setattr(stages, "STAGES", tuple(map(_spy(calls), changed)))
    rec = run_trial(spec, tmp_path / "b", progress=False)
    assert rec.status == "ok" and calls == [n for n in NAMES if n != "base_extras"]
    assert "base_extras_s" not in rec.timings
    # ... and the sweep follows: no base task, no pre_attack task, the cell needs the defence
    assert stages.task_kinds() == ("data", "defence", "attack", "cell")
    sweep = build(SweepSpec(preset="smoke", plugins=["sweep_support"], defences=[sweep_support.SFT_NAME],
                            set={**local_sets, "eval.extra": ["trainability"]}),
                  "smoke", output=str(tmp_path / "s"), models=[str(tiny_dir)])
    kinds = {s.id: s.kind for s in sweep.stages.values()}
    assert sorted(kinds.values()) == ["cell", "data", "defence"]
    cell = next(s for s in sweep.stages.values() if s.kind == "cell")
    assert [kinds[d] for d in cell.deps] == ["defence"]


def test_dag_of_the_stage_list_as_it_is(tiny_dir, tmp_path, local_sets):
    common = {k: v for k, v in local_sets.items() if not k.startswith("defence.")}
    sft = {"name": sweep_support.SFT_NAME, **{k.split(".", 1)[1]: v for k, v in local_sets.items()
                                             if k.startswith("defence.")}}
    sweep = build(SweepSpec(preset="smoke", plugins=["sweep_support"], defences=[sft, "none"],
                            set={**common, "eval.extra": ["trainability"]}),
                  "smoke", output=str(tmp_path / "s"), models=[str(tiny_dir)])
    by_id = sweep.stages
    deps = {s.id: sorted(by_id[d].kind for d in s.deps) for s in by_id.values()}
    for st in by_id.values():
        defended = st.spec.defence.name != "none"
        expect = {"data": [], "base": ["data"], "defence": ["data"],
                  "pre_attack": ["defence"] if defended else ["data"],
                  "cell": ["base", "pre_attack"] if defended else ["pre_attack"]}[st.kind]
        assert deps[st.id] == expect, (st.id, deps[st.id])


def test_base_extras_cached_per_seed_and_eval_data(tiny_dir, tmp_path, local_sets):
    """The base model's answer_loss / trainability depend on the seed, the drawn eval examples and
    the attack's text format: seed 1 must not reuse seed 0's file (nor a sweep its task)."""
    from harness.pipeline.components import Components
    from harness.pipeline.evaluation import base_extras_path

    info = {"id": str(tiny_dir), "parameters": 1}

    def path(seed=0, eval_data="fp-a", attack="harmfulqa"):
        spec = resolve("smoke", defence="repnoise", attack=attack, model=str(tiny_dir),
                       sets=[f"seed={seed}", "eval.extra=[answer_loss]"])
        return base_extras_path(Components.build(spec), tmp_path, info, {"fingerprint": {"eval": eval_data}})

    assert path() == path()
    assert len({path(0), path(1), path(2)}) == 3
    assert path(eval_data="fp-b") != path()
    assert path(attack="toxicity") != path()  # answer_loss formats with the attack's template
    common = {k: v for k, v in local_sets.items() if not k.startswith("defence.")}
    sweep = build(SweepSpec(preset="smoke", plugins=["sweep_support"], defences=["repnoise"], seeds=[0, 1],
                            set={**common, "eval.extra": ["answer_loss"]}),
                  "smoke", output=str(tmp_path / "s"), models=[str(tiny_dir)])
    assert len([s for s in sweep.stages.values() if s.kind == "base"]) == 2


# ---- lazy models ----------------------------------------------------------------------------------
def test_base_model_not_loaded_when_the_defended_checkpoint_is_complete(tiny_dir, tmp_path, monkeypatch,
                                                                         local_sets):
    import harness.pipeline.state as state
    from harness.sweep import worker

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    sets = [f"{k}={json.dumps(v)}" for k, v in local_sets.items()]
    spec = resolve("smoke", defence=sweep_support.SFT_NAME, model=str(tiny_dir), sets=sets)
    first = run_trial(spec, tmp_path / "r", progress=False)
    assert first.status == "ok" and first.defence_checkpoint.reused is False
    assert "load_model_s" in first.timings

    def no_base(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(state, "load_model", no_base)
    again = run_trial(spec, tmp_path / "r", progress=False, force=True)
    assert again.status == "ok", again.error
    assert again.defence_checkpoint.reused is True and "load_model_s" not in again.timings
    assert again.model == first.model  # described (parameter count) without loading the weights
    # the sweep's pre-attack task on a complete checkpoint does not load it either
    payload = {"id": "pre_attack:x:y", "kind": "pre_attack"}
    out = worker.stage_pre_attack(spec, tmp_path / "w", tmp_path / "r" / "checkpoints", payload)
    assert out["scores"] == first.scores.pre_attack


def test_skipped_is_returned_not_written(tiny_dir, tmp_path, monkeypatch, local_sets):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    spec = resolve("smoke", model=str(tiny_dir), sets=[f"{k}={json.dumps(v)}" for k, v in local_sets.items()
                                                       if not k.startswith("defence.")])
    first = run_trial(spec, tmp_path / "r", progress=False)
    again = run_trial(spec, tmp_path / "r", progress=False)
    assert not first.skipped and again.skipped and again.to_json() == first.to_json()
    text = (tmp_path / "r" / f"{spec.trial_id}.json").read_text()
    assert "skipped" not in json.loads(text)
    assert TrialRecord.read(tmp_path / "r" / f"{spec.trial_id}.json").skipped is False


# ---- harness run == a one-cell sweep --------------------------------------------------------------
def comparable(rec: dict) -> dict:
    """A record without what may differ between two runs of the same trial: timings, timestamps,
    host fields, training wall time, and where the checkpoint lives and who trained it (a sweep's
    defence task trains it, so the cell reuses it)."""
    out = {k: v for k, v in rec.items() if k not in ("timings", "started_at", "finished_at", "owner")}
    out["environment"] = {k: v for k, v in rec["environment"].items() if k not in ("hostname", "git")}
    out["train"] = {stage: {k: v for k, v in t.items() if k != "seconds"} for stage, t in rec["train"].items()}
    ck = dict(rec["defence_checkpoint"])
    ck["train"] = {k: v for k, v in ck["train"].items() if k != "seconds"}
    ck["path"] = Path(ck["path"]).name
    ck.pop("reused")
    out["defence_checkpoint"] = ck
    return out


def test_harness_run_and_a_one_cell_sweep_write_the_same_record(tiny_dir, tmp_path, tmp_path_factory, monkeypatch,
                                                                local_sets):
    import torch

    from harness.cli import main
    from harness.sweep.runner import SweepRunner

    sweep_support.start_ray(tmp_path_factory.mktemp("ray-session"))
    sweep = build(SweepSpec(preset="smoke", plugins=["sweep_support"], defences=[sweep_support.SFT_NAME],
                            set=local_sets, isolate="reuse"),
                  "smoke", output=str(tmp_path / "sweep"), models=[str(tiny_dir)])
    assert len(sweep.cells) == 1
    summary = SweepRunner(sweep, progress=False).run()
    assert summary["records"] == {"ok": 1} and summary["stages_run"] == {"data": 1, "defence": 1, "pre_attack": 1,
                                                                          "cell": 1}
    cell = sweep.cells[0]
    swept = json.loads((tmp_path / "sweep" / f"{cell.trial_id}.json").read_text())

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the arithmetic of a one-CPU Ray task
    try:
        assert main(["run", *cell.argv, "--output", str(tmp_path / "run"), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    ran = json.loads((tmp_path / "run" / f"{cell.trial_id}.json").read_text())

    assert swept["defence_checkpoint"]["reused"] is True and ran["defence_checkpoint"]["reused"] is False
    assert ran["train"]["defence"]["steps"] == 2 and ran["train"]["attack"]["steps"] == 2
    a, b = comparable(ran), comparable(swept)
    assert a.keys() == b.keys()
    for key in a:  # field by field: ids, config, scores, samples, provenance, data fingerprints, train stats
        assert a[key] == b[key], key
