import json

import pytest

from harness.cli import main
from harness.api.config import resolve
from harness.api.record import SCHEMA_VERSION
from harness.pipeline.trial import run_trial

FAST = ["eval.toxicity_scorer.name=keyword_refusal", "eval.samples=6", "eval.max_new_tokens=6",
        "eval.batch_size=4", "attack.samples=8", "attack.max_length=48", "synth.max_new_tokens=6"]


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_full_cell_writes_record_and_resumes(tiny_dir, tmp_path, isolated_cache, caplog):
    spec = resolve("smoke", model=str(tiny_dir), sets=FAST)
    out = tmp_path / "results"
    rec = run_trial(spec, out, progress=False)
    assert rec.status == "ok", rec.error
    saved = json.loads((out / f"{spec.trial_id}.json").read_text())
    assert saved["trial_id"] == spec.trial_id and saved["schema_version"] == SCHEMA_VERSION
    assert "skipped" not in saved and saved == rec.to_json()
    assert saved["config"] == spec.canonical()
    assert saved["model"]["source"] == "local" and saved["model"]["parameters"] > 0
    for phase in ("pre_attack", "post_attack"):
        h = saved["scores"][phase]["harmfulness"]
        assert h["n"] == 6 and 0 <= h["mean"] <= 1 and h["scorer"]["scorer"] == "keyword_refusal"
    assert saved["train"]["attack"]["steps"] == 2  # 8 samples / batch 4, 1 epoch
    assert saved["environment"]["packages"]["torch"]
    assert "git" in saved["environment"]
    assert {"load_model_s", "attack_s", "total_s"} <= set(saved["timings"])
    assert len(saved["samples"]["post_attack"]) == 5
    samples = (out / saved["samples_file"]).read_text().splitlines()
    assert len(samples) == 12  # 6 prompts x 2 phases
    assert saved["data"]["synthesized"][0]["generated"] == 8  # attack answers written by the base model
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))

    # second run: skipped, nothing recomputed
    again = run_trial(spec, out, progress=False)
    assert again.skipped and again.finished_at == saved["finished_at"]
    assert "skipped" not in json.loads((out / f"{spec.trial_id}.json").read_text())
    # --force reruns, and the synthesized data now comes from the cache
    forced = run_trial(spec, out, progress=False, force=True)
    assert not forced.skipped and forced.data["synthesized"][0]["cached"] == 8
    assert forced.to_json()["scores"] == saved["scores"]  # same seed, same data: same scores


def test_cli_run_prints_scores_and_skips(tiny_dir, tmp_path, isolated_cache, capsys):
    args = ["run", "--defence", "none", "--attack", "harmfulqa", "--model", str(tiny_dir), "--output",
            str(tmp_path / "r"), "--no-progress"] + [x for s in FAST for x in ("--set", s)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "pre_attack  harmfulness" in out and "post_attack harmfulness" in out
    assert main(args) == 0
    assert "already finished: skipped" in capsys.readouterr().out


def test_cli_error_exit_code(capsys):
    assert main(["run", "--defence", "nonee", "--attack", "harmfulqa", "--dry-run"]) == 2
    assert "Did you mean 'none'" in capsys.readouterr().err


def test_offline_model_id_fails_fast_with_help(monkeypatch, tmp_path):
    from harness.api.errors import ModelUnavailableError
    from harness.lib.models import hub_reachable, resolve_source
    from harness.api.config import ModelSpec

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hub_reachable.cache_clear()
    with pytest.raises(ModelUnavailableError, match="hub is unreachable.*--model DIR"):
        resolve_source(ModelSpec(id="meta-llama/Llama-2-7b-chat-hf"))
    hub_reachable.cache_clear()


def test_toxicity_attack_on_shared_decoding_trust(tiny_dir, tmp_path, isolated_cache):
    import pathlib

    folder = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "decoding_trust"
    if not folder.exists():
        pytest.skip("shared data not present")
    sets = FAST + [f"attack.dataset={{name: decoding_trust, path: {folder}}}",
                   f"attack.eval_dataset={{name: decoding_trust, path: {folder}}}"]
    spec = resolve("smoke", attack="toxicity", model=str(tiny_dir), sets=sets)
    rec = run_trial(spec, tmp_path / "r", progress=False)
    assert rec.status == "ok", rec.error
    assert "toxicity" in rec.scores.post_attack and rec.evaluation == "toxicity"
    assert rec.scores.post_attack["toxicity"]["max_new_tokens"] == 25
    assert rec.data["synthesized"] == []  # DecodingTrust rows come with continuations


def test_unavailable_scorer_swapped_for_declared_fallback(tiny_dir, tmp_path, isolated_cache, caplog):
    """Offline, Detoxify's checkpoint cannot be fetched: the smoke preset names profanity_check as
    the fallback, and the swap is logged and recorded (no silent fallback)."""
    import pathlib

    from harness.api.errors import HarnessError
    from harness.api.registry import METRICS

    folder = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "decoding_trust"
    if not folder.exists():
        pytest.skip("shared data not present")

    class Unavailable(METRICS.get("keyword_refusal")):
        kind = "toxicity"

        def check_ready(self):
            raise HarnessError("checkpoint not reachable offline")

    METRICS.add("test_unavailable_scorer", Unavailable)
    sets = [s for s in FAST if not s.startswith("eval.toxicity_scorer")] + [
        "eval.toxicity_scorer.name=test_unavailable_scorer", "eval.toxicity_scorer.fallback=profanity_check",
        f"attack.dataset={{name: decoding_trust, path: {folder}}}",
        f"attack.eval_dataset={{name: decoding_trust, path: {folder}}}", "attack.samples=4"]
    spec = resolve("smoke", attack="toxicity", model=str(tiny_dir), sets=sets)
    with caplog.at_level("WARNING"):
        rec = run_trial(spec, tmp_path / "r", progress=False)
    assert rec.status == "ok", rec.error
    prov = rec.scores.post_attack["toxicity"]["scorer"]
    assert prov["scorer"] == "profanity_check"
    assert prov["fallback_from"]["scorer"] == "test_unavailable_scorer"
    assert any("fallback 'profanity_check'" in n for n in rec.notes)
    assert any("fallback 'profanity_check'" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    # without a declared fallback the error stands, before any model is loaded
    spec2 = resolve("smoke", attack="toxicity", model=str(tiny_dir),
                    sets=[s for s in sets if "fallback" not in s] + ["eval.toxicity_scorer.fallback=null"])
    with pytest.raises(HarnessError, match="not reachable offline"):
        run_trial(spec2, tmp_path / "r2", progress=False)


def test_profanity_check_scores_offensive_text_higher():
    from harness.api.registry import METRICS

    scorer = METRICS.get("profanity_check")()
    clean, rude, empty = scorer.score(["p"] * 3, ["have a lovely day", "shut up you stupid fucking idiot", ""])
    assert rude > 0.9 and clean < 0.2 and empty == 0.0


def test_smoke_run_with_capability_and_trainability(tiny_dir, tmp_path, isolated_cache, capsys):
    """`--eval capability,trainability` on the smoke preset: both land in the record and the CLI
    summary, for the defended model, and the criteria compare them with the base model."""
    import pathlib

    viggo = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "viggo"
    if not viggo.exists():
        pytest.skip("shared data not present")
    from harness.api.components import Defence
    from harness.api.registry import DEFENCES

    class Scale(Defence):
        """Test defence: scales the LM head (changes capability without training)."""

        needs_data = False

        def apply(self, model, tokenizer, data, ctx):
            import torch

            with torch.no_grad():
                model.get_output_embeddings().weight.mul_(0.5)
            return model

    DEFENCES.add("test_scale_head", Scale)
    args = ["run", "--defence", "test_scale_head", "--attack", "harmfulqa", "--model", str(tiny_dir), "--output",
            str(tmp_path / "r"), "--no-progress", "--eval", "capability,trainability",
            "--set", "eval.params.trainability.samples=8", "--set", "eval.params.trainability.eval_samples=4",
            "--set", "eval.params.trainability.max_new_tokens=8", "--set", f"eval.params.trainability.path={viggo}"] + [x for s in FAST for x in ("--set", s)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "capability" in out and "trainability" in out
    rec = next(json.loads(p.read_text()) for p in (tmp_path / "r").glob("*.json"))
    pre = rec["scores"]["pre_attack"]
    assert pre["capability"]["tasks"]["smoke_arith"]["n"] == 60
    assert {"rouge1", "rouge2", "rougeL"} <= set(pre["trainability"])
    assert "capability" in rec["scores"]["post_attack"]
    assert "smoke_arith" in rec["criteria"]["stability"]["capability_delta"]
    assert set(rec["criteria"]["trainability"]) == {"rouge1_delta", "rouge2_delta", "rougeL_delta"}
