"""Faults: divergence, out-of-memory, disk full, and real process kills at every instrumented point.

The kill test drives ``tests/fault_driver.py`` in a subprocess: a clean run of a tiny trial (with a
data-reading test defence, so there is a defended checkpoint) records the order of its
instrumented events; then, for every event, a forked child runs the same trial and SIGKILLs
itself at that event, and another child resumes the folder. The resumed record must equal the
clean one (scores, config, data, samples, training losses), and no file the killed run left
behind (``*.tmp``, ``*.partial-*``, a checkpoint folder without ``.complete``) may be opened.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fault_driver
from harness.api.config import resolve
from harness.lib.store import ResultStore
from harness.pipeline.trial import run_trial

DRIVER = Path(fault_driver.__file__)
TD = fault_driver.TEST_DEFENCE


# ---- helpers ---------------------------------------------------------------------------------------
def comparable(rec: dict) -> dict:
    """What must not depend on whether a run was interrupted (no timings, no cache bookkeeping)."""
    data = dict(rec["data"])
    data["synthesized"] = [{k: v for k, v in s.items() if k not in ("generated", "cached")}
                           for s in data.get("synthesized", [])]
    train = {stage: {k: v for k, v in (t or {}).items() if k != "seconds"} for stage, t in rec["train"].items()}
    return {"status": rec["status"], "scores": rec["scores"], "config": rec["config"], "data": data,
            "samples": rec["samples"], "train": train, "criteria": rec["criteria"]}


def run_campaign(tiny_dir, root: Path, chains: list[str], timeout: int):
    env = {**os.environ, "PYTHONPATH": str(DRIVER.parent.parent)}
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(DRIVER), "campaign", "--model", str(tiny_dir), "--root", str(root),
                           *chains], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    campaign = json.loads((root / "campaign.json").read_text())
    clean = json.loads(next((root / "clean" / "results").glob("*.json")).read_text())
    assert clean["status"] == "ok", clean["error"]
    return campaign, clean, proc, time.time() - t0


def check_chain(folder: Path, clean: dict) -> dict:
    chain = json.loads((folder / "chain.json").read_text())
    faults = json.loads((folder / "faults.json").read_text())
    res = json.loads((folder / "resume.json").read_text())
    rec = res["record"]
    where = f"{folder.name} killed at {faults}"
    assert chain["resume"] == {"signal": None, "exit": 0}, where
    finished_before = chain["kills"][-1]["signal"] is None  # the last run was not killed after all
    assert rec["status"] == "ok" and res["skipped"] == finished_before, (where, rec.get("error"))
    assert "skipped" not in rec
    assert comparable(rec) == comparable(clean), where
    # nothing the killed run left half-done was read
    assert res["opened_untrusted"] == [], (where, res["opened_untrusted"])
    # the defended checkpoint was reused exactly when it was complete
    if not finished_before:
        assert rec["defence_checkpoint"]["reused"] == res["ck_complete_before"], where
    # the final record on disk is the complete one
    on_disk = json.loads((folder / "results" / f"{rec['trial_id']}.json").read_text())
    assert on_disk["status"] == "ok" and comparable(on_disk) == comparable(clean), where
    return chain


# ---- real process kills ------------------------------------------------------------------------------
def test_kill_at_every_point_then_resume(tiny_dir, tmp_path):
    """>= 20 kill points: data synthesis, defence steps, checkpoint save (weights written, marker
    missing, marker not renamed), pre-attack generation and cache, attack steps, post-attack
    generation, samples and record writes."""
    campaign, clean, proc, seconds = run_campaign(tiny_dir, tmp_path / "campaign", ["all"], timeout=400)
    trace = campaign["trace"]
    stages = {e["stage"] for e in trace}
    assert {"data", "defence", "pre_attack", "attack", "post_attack", "record"} <= stages, stages
    assert len(trace) >= 20 and len(campaign["chains"]) == len(trace)
    points = {e["point"] for e in trace}
    assert {"optimizer_step", "generate_batch", "save_weights", "marker", "rename"} <= points
    reused = 0
    for folder, event in zip(campaign["chains"], trace):
        chain = check_chain(Path(folder), clean)
        kill = chain["kills"][0]
        assert kill["signal"] == signal.SIGKILL, (folder, event, kill)  # it really died there
        reused += json.loads((Path(folder) / "resume.json").read_text())["record"]["defence_checkpoint"]["reused"]
    assert 0 < reused < len(trace)  # some resumes reused the checkpoint, some had to retrain
    print(f"{len(trace)} kill points in {seconds:.1f}s")


@pytest.mark.slow
def test_random_double_kills_then_resume(tiny_dir, tmp_path):
    """Each chain is killed twice at random events (the second run resumes the first's folder and
    is killed again, or finishes if its event never comes), then resumed. Seed: HARNESS_FAULT_SEED."""
    seed = int(os.environ.get("HARNESS_FAULT_SEED", time.time_ns() % 100000))
    print(f"HARNESS_FAULT_SEED={seed}")
    clean_root = tmp_path / "probe"
    campaign, clean, _, _ = run_campaign(tiny_dir, clean_root, ["rename:1"], timeout=300)
    trace = campaign["trace"]
    rng = random.Random(seed)
    chains = []
    for _ in range(12):
        a, b = rng.choice(trace), rng.choice(trace)
        chains.append(f"{a['point']}:{a['k']}+{b['point']}:{b['k']}")
    campaign, clean, _, _ = run_campaign(tiny_dir, tmp_path / "double", chains, timeout=600)
    for folder in campaign["chains"]:
        chain = check_chain(Path(folder), clean)
        assert chain["kills"][0]["signal"] == signal.SIGKILL, (seed, folder)
        assert chain["kills"][1]["signal"] in (signal.SIGKILL, None), (seed, folder)


# ---- in-process faults ----------------------------------------------------------------------------------
def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def cell(tiny_dir, tmp_path, monkeypatch):
    """A tiny trial with the test defence on local data that carries answers and refusals (so no
    text is synthesised and every generate call is evaluation): defence 12 rows in batches of 6
    (2 steps), attack 8 rows in batches of 4 (2 steps), evaluation 6 prompts in batches of 3."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    fault_driver.register(monkeypatch)
    d = _jsonl(tmp_path / "defence.jsonl", [{"prompt": f"how to do bad thing {i}", "response": f"do it so {i}",
                                             "refusal": "I cannot help with that."} for i in range(12)])
    a = _jsonl(tmp_path / "attack.jsonl", [{"prompt": f"question number {i}", "response": f"here it is {i}"}
                                           for i in range(14)])

    def make(*extra, seed=None):
        sets = fault_driver.FAST + [f"defence.dataset={{name: local, path: {d}}}", "defence.samples=12",
                                    "defence.batch_size=6", "defence.max_length=32",
                                    f"attack.dataset={{name: local, path: {a}}}",
                                    f"attack.eval_dataset={{name: local, path: {a}}}", "eval.batch_size=3",
                                    *extra]
        return resolve("smoke", defence=TD, model=str(tiny_dir), sets=sets, seed=seed)

    return make


def _patch_training_forward(monkeypatch, at: int, effect):
    """Apply ``effect(output)`` to the ``at``-th forward pass in training mode (defence: 1-2, attack: 3-4)."""
    from transformers import LlamaForCausalLM

    orig = LlamaForCausalLM.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == at:
                return effect(out)
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    return calls


@pytest.mark.parametrize("at, stage, step, value", [
    (2, "defence", 2, float("nan")),
    (3, "attack", 1, float("inf")),
    (4, "attack", 2, float("nan")),
])
def test_non_finite_loss_is_diverged_with_step(cell, tmp_path, monkeypatch, at, stage, step, value):
    def poison(out):
        out.loss = out.loss * value
        return out

    _patch_training_forward(monkeypatch, at, poison)
    spec = cell()
    rec = run_trial(spec, tmp_path / "results", progress=False)
    assert rec.status == "diverged"
    assert rec.error.stage == stage and rec.error.step == step
    assert rec.error.type == "DivergedError" and str(value) in rec.error.loss
    assert rec.scores.post_attack == {}
    saved = ResultStore(tmp_path / "results").load(spec.trial_id)
    assert saved.status == "diverged" and saved.error.step == step
    ck = tmp_path / "results" / "checkpoints" / spec.defence_key()
    if stage == "defence":  # a diverged defence saves nothing that a later run could reuse
        assert not ck.exists() and not list(ck.parent.glob("*.partial-*"))
    else:
        assert (ck / ".complete").exists()


@pytest.mark.parametrize("where, stage, batch", [("train:1", "defence", 6), ("train:3", "attack", 4),
                                                 ("generate:1", "pre_attack", 3), ("generate:3", "post_attack", 3)])
def test_out_of_memory_is_recorded_with_batch_size(cell, tmp_path, monkeypatch, where, stage, batch):
    from transformers.generation.utils import GenerationMixin

    def oom(*_):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")

    kind, k = where.split(":")
    if kind == "train":
        _patch_training_forward(monkeypatch, int(k), oom)
    else:
        orig, calls = GenerationMixin.generate, {"n": 0}

        def generate(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == int(k):
                oom()
            return orig(self, *args, **kwargs)

        monkeypatch.setattr(GenerationMixin, "generate", generate)
    spec = cell()
    rec = run_trial(spec, tmp_path / "results", progress=False)
    assert rec.status == "oom", rec.error
    assert rec.error.type == "OutOfMemory" and rec.error.stage == stage
    assert rec.error.batch_size == batch
    assert "Tried to allocate 20.00 GiB" in rec.error.message
    store = ResultStore(tmp_path / "results")
    assert store.load(spec.trial_id).status == "oom"
    assert not store.is_finished(spec.trial_id)  # an OOM is retried by the next run


def _enospc_fsync(monkeypatch, match, after: int = 0):
    """``os.fsync`` raises ENOSPC for files whose path satisfies ``match(path)``, once ``after``
    such calls have succeeded (atomic writes fsync their temporary file before the rename)."""
    real = os.fsync
    matched = {"n": 0}

    def fsync(fd):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if match(path):
            matched["n"] += 1
            if matched["n"] > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _tmp_of(name: str):
    """Matches the temporary file of an atomic write of ``name`` (``.NAME.XXXX.tmp``)."""
    return lambda path: Path(path).name.startswith(f".{name}.") and path.endswith(".tmp")


def test_disk_full_while_saving_checkpoint(cell, tmp_path, monkeypatch):
    import transformers

    orig = transformers.PreTrainedModel.save_pretrained

    def save_pretrained(self, folder, *args, **kwargs):
        Path(folder, "model.safetensors").write_bytes(b"\0" * 1024)  # some of it got written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_pretrained)
    spec = cell()
    rec = run_trial(spec, tmp_path / "results", progress=False)  # returns: the caller is not crashed
    assert rec.status == "error" and rec.error.stage == "defence"
    assert rec.error.errno == "ENOSPC" and "No space left" in rec.error.message
    ck_root = tmp_path / "results" / "checkpoints"
    assert not list(ck_root.glob("*.partial-*")), "the partial copy is removed to free the space"
    assert not (ck_root / spec.defence_key()).exists()
    assert ResultStore(tmp_path / "results").load(spec.trial_id).status == "error"
    # space is back: the next run redoes the trial
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", orig)
    again = run_trial(spec, tmp_path / "results", progress=False)
    assert again.status == "ok" and again.defence_checkpoint.reused is False


def test_disk_full_while_writing_samples(cell, tmp_path, monkeypatch):
    _enospc_fsync(monkeypatch, lambda path: "/samples/" in path)
    spec = cell()
    rec = run_trial(spec, tmp_path / "results", progress=False)
    assert rec.status == "error" and rec.error.stage == "post_attack"
    assert rec.error.errno == "ENOSPC"
    saved = ResultStore(tmp_path / "results").load(spec.trial_id)
    assert saved.status == "error"
    assert not list((tmp_path / "results").rglob("*.tmp"))


def test_disk_full_while_writing_the_record_fails_the_trial_not_the_sweep(cell, tmp_path, monkeypatch):
    """The final record cannot be written: run_trial returns an error record (the 'running'
    record on disk is not trusted by the next run), and the next trial of the loop still runs."""
    spec_a, spec_b = cell(), cell(seed=1)
    record_a = f"{spec_a.trial_id}.json"
    # the first write of trial A's record ("running") succeeds, every later one fails
    _enospc_fsync(monkeypatch, _tmp_of(record_a), after=1)
    out = tmp_path / "results"
    results = [run_trial(spec, out, progress=False) for spec in (spec_a, spec_b)]  # a sweep loop
    a, b = results
    assert a.status == "error" and a.error.errno == "ENOSPC"
    assert a.error.during == "writing the result record"
    assert b.status == "ok"
    store = ResultStore(out)
    assert store.load(spec_a.trial_id).status == "running" and not store.is_finished(spec_a.trial_id)
    assert not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    fault_driver.register(monkeypatch)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    assert run_trial(spec_a, out, progress=False).status == "ok"


def test_disk_full_before_anything_runs(cell, tmp_path, monkeypatch):
    import harness.pipeline.state

    spec = cell()
    _enospc_fsync(monkeypatch, _tmp_of(f"{spec.trial_id}.json"))
    monkeypatch.setattr(harness.pipeline.state, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    rec = run_trial(spec, tmp_path / "results", progress=False)
    assert rec.status == "error" and rec.error.stage == "setup" and rec.error.errno == "ENOSPC"
    assert not (tmp_path / "results" / f"{spec.trial_id}.json").exists()


def test_incomplete_checkpoint_is_not_trusted(cell, tmp_path):
    """A checkpoint folder without its marker (a save that was killed) is retrained, not loaded."""
    spec = cell()
    ck = tmp_path / "results" / "checkpoints" / spec.defence_key()
    ck.mkdir(parents=True)
    (ck / "config.json").write_text("{not json")
    (ck / "model.safetensors").write_bytes(b"garbage")
    rec = run_trial(spec, tmp_path / "results", progress=False)
    assert rec.status == "ok" and rec.defence_checkpoint.reused is False
    assert (ck / ".complete").exists() and json.loads((ck / "config.json").read_text())
