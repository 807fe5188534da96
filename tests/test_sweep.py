"""Sweep grid expansion, the stage DAG, resume scanning, the cost model and --dry-run (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sweep_support  # noqa: F401 - registers the test defences
from harness.api.errors import ConfigError
from harness.api.record import SCHEMA_VERSION
from harness.lib.store import atomic_write_json
from harness.sweep.dag import attacked_folder, build, marker_path, simulate
from harness.sweep.grid import SweepSpec, copy_spec, expand, format_value, load_sweep_spec

FIXTURES = Path(__file__).parent / "fixtures" / "sweeps"


def fixture_sweep(name: str, tiny_dir, out: Path, **changes):
    spec, preset, _ = load_sweep_spec(str(FIXTURES / name))
    if changes:
        spec = copy_spec(spec, **changes)
    return build(spec, preset, output=str(out), models=[str(tiny_dir)])


def test_cell_ids_equal_harness_run(tiny_dir, tmp_path):
    from harness.cli import build_parser, spec_from_args

    sweep = fixture_sweep("tiny_2x3.yaml", tiny_dir, tmp_path)
    assert len(sweep.cells) == 6
    assert len({c.trial_id for c in sweep.cells}) == 6
    for cell in sweep.cells:
        args = build_parser().parse_args(["run", *cell.argv])
        assert spec_from_args(args).trial_id == cell.trial_id
        assert cell.command().startswith("harness run --preset smoke --defence sweep_counting --attack harmfulqa")
    lrs = sorted({c.spec.canonical()["attack"]["lr"] for c in sweep.cells})
    assert lrs == [3e-5, 6e-5, 8e-5]
    # stable: the same file gives the same ids in the same order
    again = fixture_sweep("tiny_2x3.yaml", tiny_dir, tmp_path)
    assert [c.trial_id for c in again.cells] == [c.trial_id for c in sweep.cells]


def test_every_axis(tiny_dir):
    spec = SweepSpec(preset="smoke", plugins=["sweep_support"],
                     defences=["none", {"name": "sweep_counting", "tag": "x"},
                               {"name": "sweep_counting", "label": "y", "set": {"tag": "y", "noise": 0.01}}],
                     attacks=["harmfulqa", {"name": "harmfulqa", "label": "all-tokens", "loss_on": "all"}],
                     attack_lr=[3e-5, 8e-5], attack_samples=[8, 16], seeds=[0, 1],
                     evals=[{"label": "short", "max_new_tokens": 6}, {"label": "long", "max_new_tokens": 8}],
                     grid={"attack.epochs": [1, 2]}, set=sweep_support.FAST_SETS,
                     exclude=[{"defence": "none", "seed": 1}])
    cells = expand(spec, "smoke", models=[str(tiny_dir)])
    assert len(cells) == 3 * 2 * 2 * 2 * 2 * 2 * 2 - 2 * 2 * 2 * 2 * 2  # none x seed 1 excluded
    by_label = {(c.labels["defence"], c.labels["attack"], c.labels["seed"], c.labels["eval"], c.labels["attack.epochs"],
                 c.labels["attack_lr"], c.labels["attack_samples"]): c for c in cells}
    c = by_label[("y", "all-tokens", 1, "long", 2, 8e-5, 16)].spec.canonical()
    assert c["defence"]["tag"] == "y" and c["defence"]["noise"] == 0.01
    assert c["attack"]["loss_on"] == "all" and c["attack"]["epochs"] == 2 and c["attack"]["samples"] == 16
    assert c["eval"]["max_new_tokens"] == 8 and c["seed"] == 1 and c["eval"]["samples"] == 4
    assert not any(k[0] == "none" and k[2] == 1 for k in by_label)
    assert "sweep_counting[tag=x]" in {k[0] for k in by_label}


def test_axis_values_that_mean_the_same_cell_are_merged(tiny_dir):
    spec = SweepSpec(preset="smoke", attacks=["harmfulqa"], attack_lr=[8e-5, 8.0e-5], set=sweep_support.FAST_SETS)
    assert len(expand(spec, "smoke", models=[str(tiny_dir)])) == 1


def test_bad_sweeps_fail_early(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        SweepSpec  # noqa: B018
        bad = tmp_path / "bad.yaml"
        bad.write_text("preset: smoke\nattack_lrs: [1]\n")
        load_sweep_spec(str(bad))
    spec = SweepSpec(preset="smoke", defences=[{"name": "sweep_counting", "tagg": "x"}], plugins=["sweep_support"])
    with pytest.raises(ConfigError, match="tagg"):
        expand(spec, "smoke", models=[str(tiny_dir)])
    with pytest.raises(ConfigError, match="cannot be imported"):
        expand(SweepSpec(plugins=["no_such_plugin_module"]), "smoke")
    plain = tmp_path / "plain.yaml"
    plain.write_text("model: {id: smollm2-135m-instruct}\n")
    with pytest.raises(ConfigError, match="no 'sweep:' section"):
        load_sweep_spec(None, str(plain))
    with pytest.raises(ConfigError, match="empty"):
        expand(SweepSpec(exclude=[{}], set=sweep_support.FAST_SETS), "smoke", models=[str(tiny_dir)])


@pytest.mark.parametrize("value", [3e-5, 8.0e-5, 1, 0, True, None, "smoke", "a b", [1, 2], {"name": "smoke"},
                                   {"name": "decoding_trust", "path": "../x", "type": "toxic"}, 1e-10, 12345.5])
def test_format_value_round_trips(value):
    from harness.api.config import parse_value

    assert parse_value(format_value(value)) == value


def test_format_value_refuses_what_set_cannot_say():
    with pytest.raises(ConfigError):
        format_value("1e3")  # a string that --set would read as a number


def test_dag_shares_defence_and_pre_attack(tiny_dir, tmp_path):
    sweep = fixture_sweep("tiny_2x3.yaml", tiny_dir, tmp_path)
    kinds = [s.kind for s in sweep.stages.values()]
    assert kinds.count("defence") == 2 and kinds.count("pre_attack") == 2 and kinds.count("cell") == 6
    assert kinds.count("data") == 1  # missing texts generated once, before anything trains
    data = next(s for s in sweep.stages.values() if s.kind == "data")
    assert len(data.cells) == 6 and data.more_specs == []  # all 6 cells draw the same data
    for st in sweep.stages.values():
        if st.kind == "defence":
            assert len(st.cells) == 3 and st.deps == [data.id]
            assert st.id == f"defence:{st.spec.defence_key()}"
        if st.kind == "pre_attack":
            assert len(st.deps) == 1 and sweep.stages[st.deps[0]].kind == "defence"
            assert st.cells == sweep.stages[st.deps[0]].cells
        if st.kind == "cell":
            assert len(st.deps) == 1 and sweep.stages[st.deps[0]].kind == "pre_attack"
    # topological order and priorities: a defence outranks what follows it
    order = list(sweep.stages)
    for st in sweep.stages.values():
        assert all(order.index(d) < order.index(st.id) for d in st.deps)
        assert all(sweep.stages[d].rank > st.rank for d in st.deps)


def test_dag_none_extras_and_fsdp(tiny_dir, tmp_path):
    spec = SweepSpec(preset="smoke", plugins=["sweep_support"], defences=["none", "sweep_refusal_sft"],
                     attack_lr=[3e-5, 8e-5], set={**sweep_support.FAST_SETS, "eval.extra": ["trainability"]},
                     resources={"attack": {"num_gpus": 1, "workers": 2}})
    sweep = build(spec, "smoke", output=str(tmp_path), models=[str(tiny_dir)])
    kinds = {}
    for st in sweep.stages.values():
        kinds.setdefault(st.kind, []).append(st)
    assert len(kinds["defence"]) == 1  # none trains nothing
    assert len(kinds["base"]) == 1  # base-model extras once, for the defended cells only
    assert len(kinds["base"][0].cells) == 2
    assert len(kinds["pre_attack"]) == 2
    none_pre = next(s for s in kinds["pre_attack"] if s.spec.defence.name == "none")
    assert none_pre.deps == [kinds["data"][0].id]
    assert len(kinds["data"]) == 1 and len(kinds["data"][0].more_specs) == 1  # none draws no defence data
    assert len(kinds["attack"]) == 4 and all(s.resources.workers == 2 for s in kinds["attack"])
    for cell in kinds["cell"]:
        deps = {sweep.stages[d].kind for d in cell.deps}
        assert "attack" in deps and "pre_attack" in deps
        assert cell.resources.workers == 1


def test_scan_resumes_from_disk(tiny_dir, tmp_path):
    from harness.lib.checkpoints import MARKER

    sweep = fixture_sweep("tiny_2x3.yaml", tiny_dir, tmp_path)
    finished, todo = sweep.scan()
    assert finished == set() and todo == set(sweep.stages)
    defence = next(s for s in sweep.stages.values() if s.kind == "defence")
    pre = next(s for s in sweep.stages.values() if s.kind == "pre_attack" and s.deps == [defence.id])
    # a half-written checkpoint (no marker) and a temp record are not trusted
    (sweep.storage / defence.spec.defence_key()).mkdir(parents=True)
    (tmp_path / f".{defence.cells[0]}.json.abc.tmp").write_text("{")
    (tmp_path / f"{defence.cells[1]}.json").write_text('{"trial_id": "x", "status": "ok"')  # damaged
    _, todo = sweep.scan()
    assert defence.id in todo
    # a complete checkpoint and a pre-attack marker pointing at an existing file are
    atomic_write_json(sweep.storage / defence.spec.defence_key() / MARKER, {})
    target = sweep.storage / defence.spec.defence_key() / "pre_attack-x.json"
    atomic_write_json(marker_path(sweep.storage, pre), {"path": str(target)})
    _, todo = sweep.scan()
    assert defence.id not in todo and pre.id in todo  # the marker's target is missing
    atomic_write_json(target, {"scores": {}, "rows": []})
    _, todo = sweep.scan()
    assert pre.id not in todo
    # finished records: their cells and everything only they need drop out
    for tid in defence.cells:
        atomic_write_json(tmp_path / f"{tid}.json", {"trial_id": tid, "status": "ok", "schema_version": SCHEMA_VERSION,
                                                     "config": {}})
    finished, todo = sweep.scan()
    assert finished == set(defence.cells)
    assert not any(st.id in todo for st in sweep.stages.values() if set(st.cells) <= finished)
    assert len([s for s in todo if s.startswith("cell:")]) == 3
    # error / running records are retried
    atomic_write_json(tmp_path / f"{defence.cells[0]}.json",
                      {"trial_id": defence.cells[0], "status": "error", "schema_version": SCHEMA_VERSION, "config": {}})
    finished, todo = sweep.scan()
    assert f"cell:{defence.cells[0]}" in todo
    assert attacked_folder(sweep.storage, "t") == sweep.storage / "attacked" / "t"


def test_simulated_makespan(tiny_dir, tmp_path):
    sweep = fixture_sweep("tiny_2x3.yaml", tiny_dir, tmp_path)
    durations = {sid: 10.0 for sid in sweep.stages}
    # data, then 2 defences || 2 pre-attacks || 6 cells on 2 GPUs: 10 + 10 + 10 + 30
    assert simulate(sweep, 2, durations=durations) == pytest.approx(60.0)
    assert simulate(sweep, 1, durations=durations) == pytest.approx(110.0)
    assert simulate(sweep, 16, durations=durations) == pytest.approx(40.0)


def test_cost_model():
    from harness.sweep import cost
    from harness.api.config import resolve

    small = cost.model_shape("smollm2-135m-instruct")
    assert small.params == pytest.approx(1.35e8)
    seven = cost.model_shape("meta-llama/Llama-2-7b-chat-hf")
    assert seven.layers == 32 and seven.params > 6e9
    assert cost.model_shape("some-org/thing-13b").params == pytest.approx(13e9)
    spec = resolve("smoke", defence="none", model="meta-llama/Llama-2-7b-chat-hf",
                   sets=["attack.samples=1000", "attack.max_length=256", "attack.batch_size=4", "model.dtype=bfloat16",
                                                "model.precision=pure"])
    h100 = cost.estimate("cell", spec, "h100")
    a40 = cost.estimate("cell", spec, "a100-40")
    assert h100.gpus == 1.0 and a40.gpus >= 2  # 7B pure-bf16 fine-tuning does not fit a 40 GB card
    # the GPU default (float32 master weights and Adam state, 16 bytes a parameter) needs FSDP on H100s
    mixed = cost.estimate("cell", spec.model_copy(update={"model": {**spec.model.model_dump(), "precision": "auto"}}), "h100")
    assert mixed.gpus >= 2
    assert a40.seconds < h100.seconds * 10 and h100.gpu_hours > 0
    # training time: 6 x P x tokens / throughput
    p = cost.GPU_PROFILES["h100"]
    expect = 6 * seven.params * 1000 * 256 / (p.tflops * 1e12 * p.mfu)
    assert h100.detail["train_s"] == pytest.approx(expect)
    tiny = resolve("smoke", defence="none", sets=["attack.samples=8"])
    est = cost.estimate("pre_attack", tiny, "h100")
    assert est.gpus == 0.25  # a 135M model shares a GPU
    assert "6 x params x tokens" in cost.describe("h100")


def test_tiny_shape_from_config(tiny_dir):
    from transformers import AutoModelForCausalLM

    from harness.sweep import cost

    shape = cost.model_shape(str(tiny_dir))
    actual = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    assert shape.source == "config"
    assert shape.params == pytest.approx(actual, rel=0.05)


def test_dry_run(tiny_dir, tmp_path, capsys):
    from harness.cli import main

    out = tmp_path / "out"
    rc = main(["sweep", str(FIXTURES / "tiny_2x3.yaml"), "--model", str(tiny_dir), "--output", str(out),
               "--dry-run", "--num-gpus", "2", "--verbose-plan"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "defence trainings 2, attacks 6, evaluations 8" in text
    assert "expected GPU hours" in text and "expected makespan on 2 GPU(s)" in text
    assert not out.exists()  # nothing written, no Ray started
    rc = main(["sweep", str(FIXTURES / "tiny_2x3.yaml"), "--model", str(tiny_dir), "--output", str(out),
               "--dry-run", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["defence_trainings"] == 2 and plan["cells"] == 6 and len(plan["plan"]["stages"]) == 11


def test_paper_shaped_grid_dry_run(capsys):
    """The paper's grid (defences x 3 lrs x 2 sample counts x 6 seeds) as a DAG: each defence
    trains once per seed, every attack reuses it."""
    from harness.cli import main

    rc = main(["sweep", str(FIXTURES / "paper_grid.yaml"), "--dry-run", "--json", "--num-gpus", "8"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert plan["cells"] == 2 * 3 * 2 * 6
    assert plan["defence_trainings"] == 6  # repnoise x 6 seeds; none trains nothing
    assert plan["stages"]["pre_attack"]["total"] == 12
    assert plan["attacks"] == 72
    assert 3 < plan["gpu_hours_to_run"] < 100
    rc = main(["sweep", str(FIXTURES / "paper_grid.yaml"), "--dry-run", "--json", "--gpu", "a100-40"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["stages"]["attack"]["total"] == 72  # 7B attacks need FSDP on 40 GB cards
    # float32 master weights and Adam state (the GPU default): 16 bytes a parameter, sharded over >= 2 cards
    assert any(r.split("x")[0].isdigit() and int(r.split("x")[0]) >= 2 for r in plan["stages"]["attack"]["resources"])


def test_progress_display(tiny_dir, tmp_path):
    import io

    from harness.sweep.runner import SweepRunner

    class Tty(io.StringIO):
        def isatty(self):
            return True

    sweep = fixture_sweep("tiny_2x3.yaml", tiny_dir, tmp_path)
    finished, todo = sweep.scan()
    for stream, tty in ((Tty(), True), (io.StringIO(), False)):
        runner = SweepRunner(sweep, stream=stream, progress_interval=0.0)
        runner._init_state(finished, todo, None)
        runner.capacity = (2.0, 2.0)
        runner.show_progress(force=True)
        next(s for s in runner.state["stages"].values() if s["kind"] == "data")["status"] = "running"
        runner.show_progress()
        text = stream.getvalue()
        if tty:  # one live line per stage kind, redrawn in place
            assert "\x1b[5F" in text and text.count("\x1b[2K") == 10
            assert "  defence        0/2    done   0 running    2 pending   0 failed" in text
            assert "0 running    1 pending" in text and "1 running    0 pending" in text
        else:  # a log line whenever the counts change
            lines = text.splitlines()
            assert len(lines) == 2 and lines[1].startswith("[sweep tiny-2x3] data 0/1 done, 1 running | defence 0/2")
        assert "left" in text


def test_paper_preset_sweep_section(tmp_path, capsys):
    """`harness sweep --preset paper`: the paper's grid, every defence trained once per seed."""
    import yaml

    from harness.api.config import PRESET_DIR
    from harness.api.registry import DEFENCES

    preset = yaml.safe_load((PRESET_DIR / "paper.yaml").read_text())
    section = preset.get("sweep") or yaml.safe_load((FIXTURES / "paper_sweep_section.yaml").read_text())["sweep"]
    registered = [d for d in section["defences"] if (d if isinstance(d, str) else d["name"]) in DEFENCES.names()]
    section = {**section, "defences": registered}
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump({**preset, "sweep": section}, sort_keys=False))
    spec, base, _ = load_sweep_spec(None, str(path))
    sweep = build(spec, base, output=str(tmp_path / "out"))
    n_def = len(registered)
    trained = [d for d in registered if (d if isinstance(d, str) else d["name"]) != "none"]
    assert len(sweep.cells) == n_def * 3 * 2 * 6
    assert sorted({c.spec.canonical()["attack"]["lr"] for c in sweep.cells}) == [3e-5, 6e-5, 8e-5]
    assert sorted({c.spec.canonical()["attack"]["samples"] for c in sweep.cells}) == [1000, 10000]
    assert sorted({c.spec.seed for c in sweep.cells}) == [0, 1, 2, 3, 24, 48]
    assert {c.spec.model.id for c in sweep.cells} == {"meta-llama/Llama-2-7b-chat-hf"}
    assert sum(s.kind == "defence" for s in sweep.stages.values()) == len(trained) * 6
    assert all(len(s.cells) == 6 for s in sweep.stages.values() if s.kind == "defence")  # 3 lrs x 2 sizes
    for cell in sweep.cells[:3]:  # the ids `harness run --preset paper ...` gives
        from harness.cli import build_parser, spec_from_args

        argv = ["run", *cell.argv]
        argv[argv.index("--preset") + 1] = str(path)
        assert spec_from_args(build_parser().parse_args(argv)).trial_id == cell.trial_id
    summary = sweep.summary(gpus=8)
    assert summary["gpu_hours_to_run"] > 0 and summary["expected_makespan_s"] > 0


def test_fsdp_only_where_the_defence_allows_it():
    """A 7B attack does not fit a 40 GB card: FSDP attack stages, except after a defence that wraps
    the model for the attack (it keeps one GPU, with a warning)."""
    spec = SweepSpec(preset="smoke", plugins=["sweep_support"], models=["meta-llama/Llama-2-7b-chat-hf"],
                     defences=["none", "sweep_counting"], gpu="a100-40",
                     set={"model.dtype": "bfloat16", "attack.samples": 1000, "attack.max_length": 256})
    sweep = build(spec, "smoke", output="/tmp/unused")
    attacks = [s for s in sweep.stages.values() if s.kind == "attack"]
    assert [s.spec.defence.name for s in attacks] == ["none"] and attacks[0].resources.workers >= 2
    counting_cell = next(s for s in sweep.stages.values() if s.kind == "cell" and s.spec.defence.name != "none")
    assert counting_cell.resources.workers == 1 and all(not d.startswith("attack:") for d in counting_cell.deps)
