"""Resource bombs (issue 12): a YAML "billion laughs", deep nesting, sweep grids of 10^4 to 10^10
cells and a single 20 MB data row. Each is refused (or, for the row, cut and counted) in seconds
and without the memory it asks for: nothing is expanded before it is counted."""

import json
import time
import tracemalloc

import pytest

import fault_driver
from harness.api import safeio
from harness.api.config import resolve
from harness.api.errors import ConfigError
from harness.cli import main

FAST = fault_driver.FAST


def laughs(levels: int = 9, key_prefix: str = "") -> str:
    """Nine anchors of nine aliases each: 9^9 (~4 x 10^8) strings once expanded, 300 bytes as text."""
    lines = [f"{key_prefix}l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"{key_prefix}l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def bounded(fn, seconds: float = 3.0, megabytes: float = 64.0):
    """Run ``fn``; assert it took under ``seconds`` and allocated under ``megabytes`` at its peak."""
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        return fn()
    finally:
        took = time.monotonic() - t0
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        assert took < seconds and peak < megabytes, (took, peak)


# ---- YAML ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    laughs(),
    "defence_defaults:\n" + laughs(key_prefix="  ") + "description: *l8\n",  # inside keys a preset allows
    "description: " + "[" * 5000 + "]" * 5000 + "\n",  # nesting
])
def test_yaml_bombs_in_a_preset(text, tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        bounded(lambda: resolve(str(path)))
    msg = str(info.value)
    assert "bomb.yaml" in msg and ("expand to more than" in msg or "nested" in msg), msg


def test_yaml_bomb_in_a_sweep_file_and_a_set_value(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("preset: smoke\n" + laughs() + "name: *l8\n")
    msg = one_line_error(capsys, ["sweep", str(path), "--dry-run", "--num-gpus", "1"])
    assert "s.yaml" in msg and "expand to more than" in msg
    flow = "{" + ", ".join(line.strip() for line in laughs().splitlines()) + "}"
    with pytest.raises(ConfigError, match="--set value: its aliases expand to more than"):
        bounded(lambda: resolve("smoke", sets=[f"description={flow}"]))


def test_plain_aliases_still_work():
    assert safeio.parse_yaml("a: &x {lr: 1}\nb: *x\n", "test") == {"a": {"lr": 1}, "b": {"lr": 1}}


# ---- sweep grids: counted, never expanded ------------------------------------------------------------------
@pytest.mark.parametrize("axes, cells", [
    ({"attack.epochs": list(range(1, 101)), "attack.batch_size": list(range(1, 101))}, 10**4),
    ({f"defence.k{j}": list(range(10)) for j in range(10)}, 10**10),
])
def test_huge_grids_are_counted_not_expanded(axes, cells, tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("preset: smoke\n" + json.dumps({"grid": axes})[1:-1] + "\n")
    t0 = time.monotonic()
    msg = one_line_error(capsys, ["sweep", str(path), "--dry-run", "--num-gpus", "1"])
    assert time.monotonic() - t0 < 10
    assert f"the grid has {cells:,} cells" in msg and "--max-cells" in msg


def test_max_cells_raises_and_lowers_the_limit(tmp_path, capsys):
    from harness.sweep.grid import expand, load_sweep_spec

    path = tmp_path / "s.yaml"
    path.write_text("preset: smoke\ndefences: [none]\nattack_lr: [3.0e-5, 6.0e-5, 8.0e-5]\n")
    msg = one_line_error(capsys, ["sweep", str(path), "--dry-run", "--num-gpus", "1", "--max-cells", "2"])
    assert "the grid has 3 cells (3 attack_lr), over the limit of 2" in msg
    spec, preset, _ = load_sweep_spec(str(path))
    assert len(expand(spec.model_copy(update={"max_cells": 3}), preset, extra_sets=FAST)) == 3


# ---- one 20 MB row -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_20mb_row_is_cut_before_tokenizing_and_counted(suffix, tmp_path, caplog):
    from harness.lib import data as datamod
    from harness.pipeline.components import Components

    huge = "harm " * 4_000_000  # 20 MB
    path = tmp_path / f"rows{suffix}"
    rows = [{"prompt": huge, "response": "a"}] + [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(11)]
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text("prompt,response\n" + "".join(f"{r['prompt']},{r['response']}\n" for r in rows))
    datamod._LOADED.clear()
    spec = resolve("smoke", defence="none", attack="harmfulqa",
                   sets=[*FAST, f"attack.dataset={{name: local, path: '{path}', selection: file}}",
                         f"attack.eval_dataset={{name: local, path: '{path}', selection: file}}",
                         "attack.samples=4", "eval.samples=4"])
    reqs = Components.build(spec).requests()
    t0 = time.monotonic()
    drawn = datamod.draw(reqs, spec.seed, spec.disjoint)
    assert time.monotonic() - t0 < 20
    first = drawn["attack"][0]
    assert len(first.prompt) == datamod.MAX_TEXT_CHARS and first.meta["truncated"] == {"prompt": len(huge.strip())}
    summary = datamod.summarize(drawn, reqs)
    assert summary["attack"]["truncated"] == {"rows": 1, "in_dataset": 1, "max_chars": datamod.MAX_TEXT_CHARS}
    assert summary["eval"]["truncated"]["rows"] == 0
    assert any("cut to that length before tokenizing" in r.getMessage() for r in caplog.records)
