"""Per-layer weight distance between checkpoints (the paper's depth figure)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from harness.cli.analyze import register
from harness.lib.analysis import layer_rows, part_of, plot_weight_distance, weight_distance
from harness.lib.tiny import build_tiny


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wd")
    base, _ = build_tiny(root / "base", layers=3)
    # "attacked": only decoder layer 1 moves, by a known amount
    moved, _ = build_tiny(layers=3)
    with torch.no_grad():
        w = moved.model.layers[1].mlp.down_proj.weight
        w.add_(torch.full_like(w, 0.01))
    moved.save_pretrained(root / "attacked")
    expected = 0.01 * math.sqrt(w.numel())
    # "sharded": the base itself, saved in shards (distance 0 everywhere)
    base.save_pretrained(root / "sharded", max_shard_size="20KB")
    return root, expected


def test_weight_distance_per_layer(folders):
    root, expected = folders
    assert (root / "sharded" / "model.safetensors.index.json").exists()
    df = weight_distance(root / "base", [root / "attacked", root / "sharded"])
    assert list(df.columns) == ["attacked", "sharded"]
    assert list(df.index) == ["embeddings", "layer 0", "layer 1", "layer 2", "final_norm", "lm_head", "total"]
    assert df.loc["layer 1", "attacked"] == pytest.approx(expected, rel=1e-6)
    for part in ("embeddings", "layer 0", "layer 2", "final_norm", "lm_head"):
        assert df.loc[part, "attacked"] == 0.0
    assert df.loc["total", "attacked"] == pytest.approx(expected, rel=1e-6)
    assert (df["sharded"] == 0).all()
    rows = layer_rows(df)
    assert list(rows.index) == [0, 1, 2]


def test_plot_and_cli(folders, tmp_path, capsys):
    root, _ = folders
    df = weight_distance(root / "base", [root / "attacked"])
    png = plot_weight_distance(df, tmp_path / "fig" / "wd.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    parser = argparse.ArgumentParser(prog="harness")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", "weight-distance", str(root / "base"), str(root / "attacked"),
                              "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    assert (tmp_path / "out" / "weight_distance.csv").exists()
    assert (tmp_path / "out" / "weight_distance.png").exists()
    assert "layer 1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["analyze", "weight-distance", str(root / "base")])  # needs an OTHER


def test_errors_and_part_names(folders, tmp_path):
    root, _ = folders
    with pytest.raises(FileNotFoundError):
        weight_distance(root / "base", [tmp_path])
    with pytest.raises(ValueError, match="at least one"):
        weight_distance(root / "base", [])
    other = tmp_path / "gpt2"
    build_tiny(other, arch="gpt2", layers=3)
    with pytest.raises(ValueError):
        weight_distance(root / "base", [other])
    assert part_of("model.layers.12.self_attn.q_proj.weight") == "layer 12"
    assert part_of("transformer.h.3.attn.c_attn.weight") == "layer 3"
    assert part_of("transformer.wte.weight") == "embeddings"
    assert part_of("model.norm.weight") == "final_norm"
    assert part_of("lm_head.weight") == "lm_head"
