"""The worst-case leaderboard (leaderboards.worstcase) from search summaries."""

import csv
import io
import json

from leaderboards.worstcase import render_csv, render_markdown, settings_text, worstcase_rows, write


def trial(tid, harm, drop, eps=0.1, **params):
    return {"trial_id": tid, "params": params, "status": "ok", "harm": harm, "capability_drop": drop,
            "feasible": drop <= eps, "objective": harm}


SUMMARIES = [
    {"defence": "repnoise", "attack": "lora", "epsilon": 0.1,
     "trials": [trial("a", 0.9, 0.5, lr=1e-2), trial("b", 0.4, 0.05, lr=1e-3), trial("c", 0.3, -0.1, lr=1e-4)]},
    # a second search of the same cell: pooled, the shared trial "b" counted once
    {"defence": "repnoise", "attack": "lora", "epsilon": 0.1,
     "trials": [trial("b", 0.4, 0.05, lr=1e-3), trial("d", 0.6, 0.1, lr=3e-3, lora={"r": 8})]},
    {"defence": "none", "attack": "lora", "epsilon": 0.1, "trials": [trial("e", 0.8, 0.3, lr=1e-2)]},
]


def test_cells_pool_searches_and_pick_the_most_harmful_feasible_trial():
    rows = {(r["defence"], r["attack"]): r for r in worstcase_rows(SUMMARIES)}
    cell = rows[("repnoise", "lora")]
    assert cell["best_harm"] == 0.6 and cell["trial_id"] == "d"  # 0.9 exceeds the capability budget
    assert (cell["n_feasible"], cell["n_trials"]) == (3, 4)
    assert cell["settings"] == "lora={r: 8} lr=0.003"
    none = rows[("none", "lora")]
    assert none["best_harm"] is None and (none["n_feasible"], none["n_trials"]) == (0, 1)
    md = render_markdown(list(rows.values()))
    assert "| repnoise | lora | 0.600 | +0.100 | lora={r: 8} lr=0.003 | 3/4 | 0.1 |" in md
    assert "| none | lora | none feasible |" in md
    parsed = list(csv.DictReader(io.StringIO(render_csv(list(rows.values())))))
    assert [(p["defence"], p["best_harm"]) for p in parsed] == [("none", ""), ("repnoise", "0.6")]


def test_mixed_epsilons_are_shown():
    rows = worstcase_rows([SUMMARIES[2], {**SUMMARIES[2], "epsilon": 0.2}])
    assert rows[0]["epsilon"].startswith("0.2 (searches used 0.1, 0.2)")


def test_write_reads_summaries_and_draws_the_heat_map(tmp_path):
    for i, s in enumerate(SUMMARIES):
        folder = tmp_path / "results" / "_search" / f"s{i}"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(s))
    (tmp_path / "results" / "_search" / "broken").mkdir()
    (tmp_path / "results" / "_search" / "broken" / "summary.json").write_text("{")
    paths = write(tmp_path / "results", tmp_path / "out")
    assert [p.name for p in paths] == ["worstcase.csv", "worstcase.md", "worstcase.png"]
    assert paths[2].stat().st_size > 1000 and paths[2].read_bytes()[:4] == b"\x89PNG"


def test_settings_text():
    assert settings_text({"lr": 0.000123456, "lora": None, "samples": 32}) == "lora=null lr=0.000123 samples=32"
