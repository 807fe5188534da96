"""Analyses of saved checkpoints. First one: the paper's depth figure, the per-layer L2 distance
between the weights of a base model and other models (defended, attacked, ...).

    harness analyze weight-distance BASE OTHER... [--out DIR]

writes ``weight_distance.csv`` and ``weight_distance.png`` to DIR and prints the table. Each
argument is a model folder (``save_pretrained`` layout: ``model.safetensors``, a sharded
``model.safetensors.index.json`` or ``pytorch_model.bin``). Tensors are read one at a time, so
two 7B checkpoints compare in little memory.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

log = logging.getLogger(__name__)

CSV_NAME = "weight_distance.csv"
PNG_NAME = "weight_distance.png"
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


class _Weights:
    """Lazy access to the tensors of a model folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: not a model folder")
        self._files: dict[str, Path] = {}
        single = self.path / "model.safetensors"
        index = self.path / "model.safetensors.index.json"
        binary = self.path / "pytorch_model.bin"
        if single.exists():
            self._kind = "safetensors"
            self._files = {k: single for k in _safetensor_keys(single)}
        elif index.exists():
            self._kind = "safetensors"
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {k: self.path / f for k, f in weight_map.items()}
        elif binary.exists():
            self._kind = "bin"
            self._state = torch.load(binary, map_location="cpu", weights_only=True)
            self._files = {k: binary for k in self._state}
        else:
            raise FileNotFoundError(f"{self.path}: no model.safetensors, model.safetensors.index.json or "
                                    "pytorch_model.bin")
        self._open: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self._files)

    def get(self, key: str) -> torch.Tensor:
        if self._kind == "bin":
            return self._state[key]
        from safetensors import safe_open

        file = self._files[key]
        handle = self._open.get(file)
        if handle is None:
            handle = self._open[file] = safe_open(str(file), framework="pt", device="cpu")
        return handle.get_tensor(key)


def _safetensor_keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        return list(f.keys())


def part_of(key: str) -> str:
    """Which part of the network a weight belongs to: ``layer <i>``, ``embeddings``,
    ``lm_head``, ``final_norm`` or ``other``."""
    m = _LAYER.search(key)
    if m:
        return f"layer {int(m.group(1))}"
    lowered = key.lower()
    if "lm_head" in lowered or lowered.startswith("output."):
        return "lm_head"
    if any(s in lowered for s in ("embed", "wte", "wpe")):
        return "embeddings"
    if any(s in lowered for s in ("norm", "ln_f")):
        return "final_norm"
    return "other"


def _order(part: str) -> tuple[int, int]:
    if part == "embeddings":
        return (0, 0)
    if part.startswith("layer "):
        return (1, int(part.split()[1]))
    return ({"final_norm": 2, "lm_head": 3, "other": 4}.get(part, 5), 0)


def _labels(paths: Sequence[str | Path]) -> list[str]:
    names = [Path(p).name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def _squared_distances(base: _Weights, other: _Weights) -> dict[str, float]:
    sums: dict[str, float] = {}
    common = [k for k in base.keys() if k in set(other.keys())]
    missing = sorted(set(base.keys()) ^ set(other.keys()))
    if missing:
        log.warning("weight distance %s vs %s: %d tensors present in only one of them (skipped), e.g. %s",
                    base.path, other.path, len(missing), missing[:3])
    if not common:
        raise ValueError(f"{base.path} and {other.path} share no weight names; are they the same architecture?")
    for key in common:
        a, b = base.get(key), other.get(key)
        if a.shape != b.shape:
            raise ValueError(f"{key}: shape {tuple(a.shape)} in {base.path} but {tuple(b.shape)} in {other.path}; "
                             "the models are not the same architecture")
        d = float(((a.double() - b.double()) ** 2).sum())
        part = part_of(key)
        sums[part] = sums.get(part, 0.0) + d
    return sums


def weight_distance(base_path: str | Path, other_paths: Iterable[str | Path]):
    """Per-part L2 distance ``||theta_part(other) - theta_part(base)||_2`` (all tensors of a part
    flattened together) as a pandas DataFrame: one row per part in network order (embeddings,
    ``layer 0`` .. ``layer N-1``, final_norm, lm_head, other) plus ``total``; one column per
    OTHER model, named after its folder. ``df.attrs`` holds the paths."""
    import pandas as pd

    other_paths = list(other_paths)
    if not other_paths:
        raise ValueError("weight_distance needs at least one model to compare with the base")
    base = _Weights(base_path)
    columns = {}
    for label, path in zip(_labels(other_paths), other_paths):
        sums = _squared_distances(base, _Weights(path))
        col = {part: math.sqrt(v) for part, v in sums.items()}
        col["total"] = math.sqrt(sum(sums.values()))
        columns[label] = col
    parts = sorted({p for col in columns.values() for p in col if p != "total"}, key=_order) + ["total"]
    df = pd.DataFrame({label: [col.get(p, float("nan")) for p in parts] for label, col in columns.items()},
                      index=pd.Index(parts, name="part"))
    df.attrs["base"] = str(base_path)
    df.attrs["others"] = [str(p) for p in other_paths]
    return df


def layer_rows(df):
    """The ``layer <i>`` rows of a ``weight_distance`` table, indexed by the layer number."""
    rows = df[[str(i).startswith("layer ") for i in df.index]].copy()
    rows.index = [int(str(i).split()[1]) for i in rows.index]
    rows.index.name = "layer"
    return rows


def plot_weight_distance(df, png_path: str | Path, title: str | None = None) -> Path:
    """Line plot of the per-layer distances (one line per compared model), as the paper's
    depth figure; written with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = layer_rows(df)
    fig, ax = plt.subplots(figsize=(7, 4))
    for column in rows.columns:
        ax.plot(rows.index, rows[column], marker="o", markersize=3, label=str(column))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("L2 distance to base weights")
    base = df.attrs.get("base")
    ax.set_title(title or (f"Per-layer weight distance from {Path(base).name}" if base else "Per-layer weight distance"))
    ax.grid(alpha=0.3)
    if len(rows.columns):
        ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
