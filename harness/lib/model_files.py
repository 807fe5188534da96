"""Pre-flight of a local model folder, without torch or transformers: is it a loadable Hugging Face
causal LM? Checked before any model loads (``harness run``) and in a sweep's dry run, so a folder
that lacks a tokenizer or holds damaged weights fails in seconds with one line naming the file.

A folder passes when it holds:

- ``config.json``: a JSON object with a ``model_type`` (or ``architectures``);
- a tokenizer: ``tokenizer.json``, or ``tokenizer.model`` (SentencePiece), or ``vocab.json`` with
  ``merges.txt``, or ``vocab.txt``; any ``tokenizer.json``/``tokenizer_config.json`` is valid JSON;
- safetensors weights (the harness loads with ``use_safetensors=True``): ``model.safetensors``, or
  ``model.safetensors.index.json`` whose shards all exist. Each weights file's header is read and
  checked: an 8-byte length, a JSON header, and tensor offsets that end exactly at the end of the
  file (a truncated or overwritten file fails here, not after minutes of loading).

``looks_like_path`` tells a folder from a hub id (``org/name``): an id that starts with ``/``,
``.`` or ``~``, or has more than one ``/``, names a folder, and a folder that does not exist is an
error even when the hub is reachable.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from harness.api import safeio
from harness.api.errors import ModelUnavailableError

TOKENIZER_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))
MAX_HEADER = 100 << 20  # the safetensors format caps its JSON header at 100 MB


def looks_like_path(model_id: str) -> bool:
    """Whether ``model_id`` names a local folder rather than a hub id (``org/name``)."""
    return model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1 or os.path.exists(model_id)


def _json_object(path: Path, field: str) -> dict:
    data = safeio.load_json(path, f"{field}: model file", error=ModelUnavailableError)
    if not isinstance(data, dict):
        raise ModelUnavailableError(f"{field}: model file {str(path)!r} must hold a JSON object, not "
                                    f"{type(data).__name__}")
    return data


def check_safetensors(path: Path, field: str) -> None:
    """``path`` is a complete safetensors file: header length, JSON header, data extent = file size."""
    st = safeio.check_input_file(path, f"{field}: weights file", ModelUnavailableError)
    size = st.st_size
    hint = "the file is damaged or was cut short; copy or save the model again"
    if size < 8:
        raise ModelUnavailableError(f"{field}: weights file {str(path)!r} is {size} bytes, too short for safetensors; {hint}")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > min(MAX_HEADER, size - 8):
            raise ModelUnavailableError(f"{field}: weights file {str(path)!r} is not a valid safetensors file (header "
                                        f"length {n} for a {size}-byte file); {hint}")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ModelUnavailableError(f"{field}: weights file {str(path)!r} has a damaged safetensors header; {hint}") from None
    if not isinstance(header, dict):
        raise ModelUnavailableError(f"{field}: weights file {str(path)!r} has a damaged safetensors header; {hint}")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelUnavailableError(f"{field}: weights file {str(path)!r}: tensor {name!r} has no valid offsets; {hint}")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise ModelUnavailableError(f"{field}: weights file {str(path)!r} holds {size} bytes but its header describes "
                                    f"{8 + n + end}; {hint}")


def check_local_model(folder: str | os.PathLike, field: str = "model.id") -> Path:
    """``folder`` if it holds a loadable causal LM (module docstring), else ``ModelUnavailableError``."""
    path = safeio.check_path(Path(folder).expanduser(), field, ModelUnavailableError)
    shown = str(folder)
    if not path.exists():
        raise ModelUnavailableError(f"{field}={shown!r}: folder does not exist")
    if not path.is_dir():
        raise ModelUnavailableError(f"{field}={shown!r} is a file; a model is a folder (config.json, tokenizer, "
                                    "*.safetensors)")
    if not (path / "config.json").exists():
        raise ModelUnavailableError(f"{field}={shown!r}: folder has no config.json (not a saved HF model)")
    config = _json_object(path / "config.json", field)
    if not (config.get("model_type") or config.get("architectures")):
        raise ModelUnavailableError(f"{field}: {str(path / 'config.json')!r} names no model_type or architectures "
                                    "(not a Hugging Face model config)")
    if not any(all((path / f).is_file() for f in files) for files in TOKENIZER_SETS):
        raise ModelUnavailableError(f"{field}={shown!r}: folder has no tokenizer (tokenizer.json, tokenizer.model or "
                                    "vocab.json + merges.txt); save the tokenizer beside the weights "
                                    "(tokenizer.save_pretrained(FOLDER))")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (path / name).exists():
            _json_object(path / name, field)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _json_object(index, field).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelUnavailableError(f"{field}: {str(index)!r} has no weight_map; the model was not saved completely")
        shards = sorted(set(str(v) for v in weight_map.values()))
    elif (path / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        extra = f" (it holds {', '.join(others[:3])}: re-save with safe_serialization=True)" if others else ""
        raise ModelUnavailableError(f"{field}={shown!r}: folder has no safetensors weights (model.safetensors or "
                                    f"model.safetensors.index.json){extra}")
    for shard in shards:
        shard_path = path / shard
        if not shard_path.exists():
            raise ModelUnavailableError(f"{field}: weights shard {str(shard_path)!r} listed in the index is missing")
        check_safetensors(shard_path, field)
    return path
