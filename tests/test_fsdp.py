"""Multi-GPU trial training with FSDP (harness.sweep.fsdp), on CPU: gloo, 2 workers, the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sweep_support
from harness.sweep.fsdp import shard_rows

FIXTURES = Path(__file__).parent / "fixtures" / "sweeps"


def test_shard_rows_keeps_the_global_batches():
    rows = list(range(10))
    a, b = shard_rows(rows, 2, 0, 4), shard_rows(rows, 2, 1, 4)
    assert a == ([0, 1, 4, 5, 8], 2) and b == ([2, 3, 6, 7, 9], 2)
    # every rank the same number of rows, global batches = slices of the one-GPU batches
    for n in range(0, 23):
        for world in (2, 3, 4):
            shards = [shard_rows(list(range(n)), world, r, 8)[0] for r in range(world)]
            assert len({len(s) for s in shards}) == 1
            assert len(set().union(*map(set, shards))) == sum(map(len, shards))
    assert shard_rows(list(range(6)), 4, 3, 2) == ([3], 1)  # batch < world: one row per rank


def _spec(tiny_dir, extra=(), defence=sweep_support.SFT_NAME):
    from harness.api.config import resolve

    sets = [f"{k}={v}" for k, v in sweep_support.FAST_SETS.items()]
    from harness.lib.text import PROMPT_TEMPLATE, RESPONSE_SEPARATOR

    # the paper's short text format: the smoke preset's chat template does not fit 48 tokens of the
    # tiny tokenizer, so every harmful/harmless pair would be identical within max_length
    paper_text = [f"defence.template={json.dumps(PROMPT_TEMPLATE)}", f"defence.separator={json.dumps(RESPONSE_SEPARATOR)}"] if defence == "repnoise" else []
    return resolve("smoke", defence=defence, model=str(tiny_dir),
                   sets=sets + paper_text + ["defence.samples=16", "defence.max_length=48", *extra])


@pytest.mark.parametrize("defence", [sweep_support.SFT_NAME, "repnoise"])
def test_fsdp_defence_on_two_gloo_workers_matches_one_process(defence, tiny_dir, tmp_path, monkeypatch):
    """Two FSDP ranks train the same defence as one process does; rank 0 saves a loadable,
    complete checkpoint. The SFT defence takes each rank's half of every global batch; RepNoise
    (which shuffles its data and reads the LM head's weight directly in its fused logit lens) gets
    the same rows on both ranks, so the averaged gradient equals one process's on the half batches."""
    import torch
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    from harness.lib.checkpoints import is_complete, read_marker
    from harness.api.registry import DEFENCES

    if defence not in DEFENCES:
        pytest.skip(f"{defence} not registered")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    same_rows = defence != sweep_support.SFT_NAME
    batch = 8 if same_rows else 4  # RepNoise: half batches of 4 (it diverges on the tiny model at 2)
    spec = _spec(tiny_dir, defence=defence, extra=[f"defence.batch_size={batch}"])
    folder = tmp_path / "ck" / spec.defence_key()
    config = {"kind": "defence", "spec": spec.model_dump(mode="json"), "output": str(tmp_path),
              "storage": str(tmp_path / "ck"), "folder": str(folder), "plugins": ["sweep_support"]}
    mp.spawn(sweep_support.fsdp_spawn_target, args=(2, sweep_support.free_port(), config, str(tmp_path), same_rows),
             nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert is_complete(folder)
    meta = read_marker(folder)
    assert meta["train"]["fsdp"]["workers"] == 2 and meta["train"]["fsdp"]["global_batch"] == batch
    assert meta["train"]["fsdp"]["per_rank_batch"] == batch // 2 and meta["train"]["fsdp"]["backend"] == "gloo"
    assert ranks[0]["train"]["steps"] == ranks[1]["train"]["steps"] == 4
    fsdp = AutoModelForCausalLM.from_pretrained(folder)

    # the same defence in one process: whole batches of 4 (SFT) or the same half batches (RepNoise)
    from harness.lib.context import seed_everything
    from harness.pipeline.stages import run_stages
    from harness.pipeline.state import TrialPaths, open_trial

    t = open_trial(spec, TrialPaths.of(tmp_path / "single"), progress=False, device=torch.device("cpu"))
    if same_rows:
        t.comp.defence.config = t.comp.defence.config.model_copy(update={"batch_size": batch // 2})
    run_stages(t, "data")
    model, tok = t.base_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    seed_everything(spec.seed)
    single = t.comp.defence.apply(model, tok, t.parts["defence"], t.ctx.child("defence"))
    moved = diff = 0.0
    for name, w in single.state_dict().items():
        moved += float((w - base[name]).pow(2).sum())
        diff += float((w - fsdp.state_dict()[name]).pow(2).sum())
        if name.startswith(("lm_head", "model.norm", "model.embed_tokens")):  # the units RepNoise reads directly
            assert not torch.equal(fsdp.state_dict()[name], base[name]), f"{name} was not trained under FSDP"
    assert moved > 0
    print(f"FSDP vs one process ({defence}): {(diff / moved) ** 0.5:.4f} of the update norm")
    assert (diff / moved) ** 0.5 < 0.05, f"FSDP differs from one process by {(diff / moved) ** 0.5:.3f} of the update"


@pytest.mark.slow
def test_fsdp_stages_of_a_sweep_under_ray_train(tiny_dir, tmp_path, tmp_path_factory):
    """A sweep whose defence and attack ask for 2 workers: both train as Ray Train jobs (gloo),
    the cell scores the attacked model they saved, and the record says how it was trained."""
    from harness.lib.checkpoints import read_marker
    from harness.sweep.runner import SweepRunner
    from harness.lib.store import ResultStore
    from harness.sweep.dag import build
    from harness.sweep.grid import load_sweep_spec

    sweep_support.start_ray(tmp_path_factory.mktemp("ray-session"))
    spec, preset, _ = load_sweep_spec(str(FIXTURES / "tiny_fsdp.yaml"))
    sweep = build(spec, preset, output=str(tmp_path / "out"), models=[str(tiny_dir)])
    assert sorted(s.kind for s in sweep.stages.values()) == ["attack", "cell", "data", "defence", "pre_attack"]
    summary = SweepRunner(sweep, progress=False).run()
    assert summary["records"] == {"ok": 1}, summary
    rec = ResultStore(sweep.output).load(sweep.cells[0].trial_id)
    assert rec.train["attack"].fsdp["workers"] == 2
    assert rec.defence_checkpoint.reused is True
    assert read_marker(Path(rec.defence_checkpoint.path))["train"]["fsdp"]["workers"] == 2
    assert not (sweep.storage / "attacked" / sweep.cells[0].trial_id).exists()  # removed once scored
