"""Hostile files (issue 12): folders, FIFOs, binary or non-UTF-8 files, over-long names, files where
folders belong, damaged model folders and damaged caches. Each fails in seconds with one line that
names the file (exit code 2, no traceback, before any model loads), or, for a cache the harness
wrote, is moved aside with a WARNING and computed again, so a rerun does not fail the same way."""

import json
import os
import shutil
from pathlib import Path

import pytest

import fault_driver
from harness.api import safeio
from harness.api.config import resolve
from harness.api.errors import ConfigError, DataError, ModelUnavailableError
from harness.cli import main
from harness.lib.model_files import check_local_model

FAST = fault_driver.FAST


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "loading model" not in err
    return lines[0]


# ---- the checked reader: every kind of wrong file, one line naming it --------------------------------
def make(kind: str, path: Path) -> Path:
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "latin-1":
        path.write_bytes("prompt: caf\xe9\n".encode("latin-1"))
    elif kind == "missing":
        pass
    elif kind == "under a file":
        path.parent.mkdir()
        (path.parent / "f").write_text("x")
        path = path.parent / "f" / path.name
    return path


KINDS = {"folder": "is a folder, not a file", "fifo": "FIFO", "binary": "binary", "latin-1": "not UTF-8 text",
         "missing": "does not exist", "under a file": "a parent of it is a file"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_safe_reader_refuses(kind, tmp_path):
    path = make(kind, tmp_path / ("sub" if kind == "under a file" else "") / "x.yaml")
    with pytest.raises(DataError) as info:
        safeio.read_text(path, "data file", error=DataError)
    assert KINDS[kind] in str(info.value) and str(path) in str(info.value)


def test_safe_reader_size_limit_and_long_names(tmp_path, monkeypatch):
    big = tmp_path / "big.yaml"
    big.write_text("a" * (2 << 20))
    monkeypatch.setenv("HARNESS_MAX_CONFIG_MB", "1")
    with pytest.raises(ConfigError, match=r"big.yaml' is 2.0 MB, over the limit of 1.0 MB .*HARNESS_MAX_CONFIG_MB"):
        safeio.read_text(big, "preset file")
    monkeypatch.setenv("HARNESS_MAX_CONFIG_MB", "3")
    assert len(safeio.read_text(big, "preset file")) == 2 << 20
    with pytest.raises(ConfigError, match="path component .* is 300 bytes, over the file-system limit of 255"):
        safeio.read_text(tmp_path / ("n" * 300), "preset file")
    with pytest.raises(ConfigError, match="NUL"):
        safeio.read_text("a\0b", "preset file")


@pytest.mark.parametrize("kind", ["folder", "fifo", "binary", "latin-1"])
def test_preset_file(kind, tmp_path, capsys):
    path = make(kind, tmp_path / "p.yaml")
    msg = one_line_error(capsys, ["run", "--dry-run", "--preset", str(path), "--output", str(tmp_path / "r")])
    assert str(path) in msg and KINDS[kind] in msg


@pytest.mark.parametrize("kind", ["folder", "fifo", "binary"])
def test_sweep_file(kind, tmp_path, capsys):
    path = make(kind, tmp_path / "s.yaml")
    msg = one_line_error(capsys, ["sweep", str(path), "--dry-run", "--num-gpus", "1"])
    assert str(path) in msg and KINDS[kind] in msg


# ---- data files ----------------------------------------------------------------------------------------
def local(path) -> list[str]:
    return [f"attack.dataset={{name: local, path: '{path}'}}", f"attack.eval_dataset={{name: local, path: '{path}'}}",
            "attack.samples=2", "eval.samples=2"]


@pytest.mark.parametrize("kind, content, needle", [
    ("folder", None, "is a folder, not a file"),
    ("fifo", None, "FIFO"),
    ("binary", None, "binary"),
    ("latin-1", None, "not UTF-8 text"),
    ("file", '{"prompt": 5, "response": "a"}\n' * 6, "line 1: field 'prompt' (prompt) is a int, not text"),
    ("file", '{"prompt": {"a": 1}}\n' * 6, "is a dict, not text"),
    ("file", "[" * 100000 + "]" * 100000 + "\n", "nested too deeply"),
])
def test_data_file(kind, content, needle, tmp_path):
    path = tmp_path / "rows.jsonl"
    if content is None:
        path = make(kind, path)
    else:
        path.write_text(content)
    from harness.lib.data import _LOADED

    _LOADED.clear()
    spec = resolve("smoke", defence="none", attack="harmfulqa", sets=[*FAST, *local(path)])
    from harness.lib import data as datamod
    from harness.pipeline.components import Components

    with pytest.raises(DataError) as info:
        datamod.draw(Components.build(spec).requests(), spec.seed, spec.disjoint)
    assert needle in str(info.value) and "rows.jsonl" in str(info.value)


# ---- folders the run writes into: checked before anything loads --------------------------------------------
@pytest.mark.parametrize("flag", ["--output", "--checkpoints"])
def test_output_folders_that_are_files(flag, tmp_path, capsys, tiny_dir):
    target = tmp_path / "taken"
    target.write_text("x")
    argv = ["run", "--defence", "none", "--attack", "harmfulqa", "--model", str(tiny_dir), "--no-progress",
            "--output", str(tmp_path / "r"), flag, str(target)]
    msg = one_line_error(capsys, argv + [a for s in FAST for a in ("--set", s)])
    assert str(target) in msg and "is a file, not a folder" in msg
    deep = tmp_path / "taken" / "sub"
    msg = one_line_error(capsys, argv[:-2] + [flag, str(deep)] + [a for s in FAST for a in ("--set", s)])
    assert "is a file, not a folder" in msg


def test_output_folder_name_too_long(tmp_path, capsys):
    msg = one_line_error(capsys, ["run", "--dry-run", "--defence", "none", "--output", str(tmp_path / ("z" * 300))])
    assert "over the file-system limit of 255" in msg


# ---- model folders ------------------------------------------------------------------------------------------
def damaged(tiny_dir, tmp_path, how) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    if how == "no tokenizer":
        (folder / "tokenizer.json").unlink()
    elif how == "corrupt weights":
        (folder / "model.safetensors").write_bytes(b"garbage" * 10)
    elif how == "truncated weights":
        with open(folder / "model.safetensors", "r+b") as fh:
            fh.truncate(4096)
    elif how == "no weights":
        (folder / "model.safetensors").unlink()
    elif how == "config not JSON":
        (folder / "config.json").write_text("{not json")
    elif how == "config is a folder":
        (folder / "config.json").unlink()
        (folder / "config.json").mkdir()
    elif how == "missing shard":
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-2.safetensors"}}))
    return folder


@pytest.mark.parametrize("how, needle", [
    ("no tokenizer", "no tokenizer"),
    ("corrupt weights", "not a valid safetensors file"),
    ("truncated weights", "holds 4096 bytes but its header describes"),
    ("no weights", "no safetensors weights"),
    ("config not JSON", "invalid JSON"),
    ("config is a folder", "is a folder, not a file"),
    ("missing shard", "model-2.safetensors"),
])
def test_damaged_model_folder(how, needle, tiny_dir, tmp_path, capsys):
    folder = damaged(tiny_dir, tmp_path, how)
    with pytest.raises(ModelUnavailableError, match=needle):
        check_local_model(folder)
    msg = one_line_error(capsys, ["run", "--defence", "none", "--attack", "harmfulqa", "--model", str(folder),
                                  "--output", str(tmp_path / "r"), "--no-progress"])
    assert needle.split()[0] in msg


def test_whole_model_folder_passes(tiny_dir):
    assert check_local_model(tiny_dir) == Path(tiny_dir)


# ---- damaged caches: moved aside, said, computed again ---------------------------------------------------------
@pytest.mark.parametrize("damage", ["not json", "folder", "wrong shape", "binary"])
def test_damaged_generated_text_cache_is_regenerated(damage, tmp_path, tiny, caplog):
    from harness.api.components import Example
    from harness.api.config import SynthSpec
    from harness.lib.synth import _cache_file, complete

    model, tok = tiny
    settings = SynthSpec(max_new_tokens=3, batch_size=2)
    cache_dir = tmp_path / "gen"
    path = _cache_file(cache_dir, "tiny", "refusal", settings)
    path.parent.mkdir(parents=True)
    if damage == "folder":
        path.mkdir()
    elif damage == "binary":
        path.write_bytes(b"\0\1\2")
    else:
        path.write_text("{cut sh" if damage == "not json" else '["a list"]')
    rows = [Example(prompt="how do I bake bread?"), Example(prompt="how do I pick a lock?")]
    for attempt in range(2):  # the second run reads the regenerated cache
        filled, info = complete(rows, "refusal", model, tok, model_key="tiny", cache_dir=cache_dir, settings=settings,
                                progress=False)
        assert all(ex.refusal for ex in filled)
    assert info["cached"] == 2  # the second run used the new cache
    moved = list(cache_dir.glob(f"{path.name}.damaged-*"))
    assert len(moved) == 1
    assert any("damaged" in r.getMessage() and str(path) in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


def test_damaged_checkpoint_side_file_is_recomputed(tmp_path, caplog):
    from harness.pipeline.evaluation import cached_json

    path = tmp_path / "ckpt" / "pre_attack-x.json"
    path.parent.mkdir()
    path.write_text("[1, 2")
    calls = []
    value = cached_json(path, lambda: calls.append(1) or {"harm": 0.5})
    assert value == {"harm": 0.5} and calls == [1]
    assert cached_json(path, lambda: calls.append(1) or {"harm": 0.9}) == {"harm": 0.5} and calls == [1]
    assert list(path.parent.glob("pre_attack-x.json.damaged-*"))
    assert any("checkpoint side file" in r.getMessage() for r in caplog.records)
