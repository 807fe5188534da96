"""Per-stage cost model: how long each sweep stage takes, how much memory it needs, how many GPUs.

Used by ``harness sweep --dry-run`` (GPU hours, expected makespan), by the scheduler (critical-path
priorities, the time-left estimate, ``resources: auto``). It is an order-of-magnitude model,
calibrated by nothing but public hardware numbers; the scheduler rescales it per stage kind with
the durations it observes while a sweep runs.

Model (P = parameters, b = bytes per parameter of the training dtype, T = tokens)

* tokens: a training stage sees ``T = samples x max_length x epochs`` (an upper bound: batches are
  padded to their longest row, at most ``max_length``).
* training time  = 6 P T f / (peak_flops x mfu x n_gpus x eff(n_gpus)), ``f`` the defence's
  relative cost per token (``cost_factor`` class attribute of a defence, else ``DEFENCE_FACTORS``:
  RepNoise runs a harmful and a harmless pass plus a per-layer logit lens, ~3x a plain SFT step).
* generation time (one evaluation) = ceil(n / batch) x max_new_tokens x (P b / (hbm_bw x 0.6))
  (decoding is memory-bound: every step reads the weights once) + prefill 2 P n L_prompt / flops,
  + n / qps for an API scorer (Perspective), + ``EXTRA_EVAL_S`` per extra evaluation (lm-eval, ...),
  scaled by P / 7e9.
* fixed costs per stage: ``STAGE_OVERHEAD_S`` (process start, imports) + loading P b bytes at
  ``LOAD_BPS`` (+ saving at ``SAVE_BPS`` for a defence).
* memory, training: P (2b + 2b) (weights, gradients, two Adam moments, all in the model dtype as
  ``harness.training`` keeps them) + activations ``batch x max_length x layers x hidden x 34 x b/2``
  (Korthikanti et al. 2022, no recomputation) x f; inference: P b + KV cache.
* GPUs: a stage that fits ``USABLE`` of one GPU asks for a fraction of it (quarters, small models
  below ``FRACTIONAL_BELOW`` parameters only) or one GPU; a training stage that does not fit asks
  for ``n`` GPUs and trains with FSDP (``harness.fsdp``), where the weights, gradients and Adam
  state are sharded n ways and activations are not.

GPU hours of a stage = its time x the GPUs it holds. Profiles (``GPU_PROFILES``) hold dense bf16
peak TFLOP/s, HBM bandwidth and memory of common cards, and a ``cpu`` profile for runs without a GPU.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

STAGE_OVERHEAD_S = 20.0  # worker start, imports, tokenizer, data
LOAD_BPS = 2e9  # bytes/s reading safetensors
SAVE_BPS = 1e9  # bytes/s writing safetensors (fsynced)
EXTRA_EVAL_S = 900.0  # one extra evaluation (lm-eval tasks, trainability) of a 7B model on one H100
USABLE = 0.85  # fraction of a GPU's memory a stage may plan to use
FRACTIONAL_BELOW = 1.5e9  # models this small may share a GPU
FSDP_EFFICIENCY = 0.85  # throughput per GPU under FSDP relative to one GPU
PROMPT_TOKENS = 64  # typical formatted prompt length at evaluation

DEFENCE_FACTORS = {"none": 0.0, "random_init": 0.0, "repnoise": 3.0, "repnoise_corrected": 2.5,
                   "adversarial": 2.0, "vaccine": 2.0, "gradient_ascent": 1.5, "safety_training": 1.0,
                   "security_vectors": 0.7}


@dataclass(frozen=True)
class GpuProfile:
    name: str
    memory_gb: float
    tflops: float  # dense bf16 peak (fp32 for cpu)
    hbm_tbps: float
    mfu: float  # achieved fraction of peak in training


GPU_PROFILES = {
    "h100": GpuProfile("NVIDIA H100 80GB SXM", 80, 989, 3.35, 0.35),
    "h200": GpuProfile("NVIDIA H200 141GB", 141, 989, 4.8, 0.38),
    "a100-80": GpuProfile("NVIDIA A100 80GB", 80, 312, 2.0, 0.40),
    "a100-40": GpuProfile("NVIDIA A100 40GB", 40, 312, 1.55, 0.40),
    "l40s": GpuProfile("NVIDIA L40S 48GB", 48, 362, 0.86, 0.30),
    "a10g": GpuProfile("NVIDIA A10G 24GB", 24, 125, 0.6, 0.30),
    "cpu": GpuProfile("CPU (no GPU)", 64, 0.5, 0.05, 0.30),
}

# parameters, layers, hidden size of models the presets name (no download needed)
KNOWN_MODELS = {
    "meta-llama/llama-2-7b-chat-hf": (6.74e9, 32, 4096),
    "meta-llama/llama-2-7b-hf": (6.74e9, 32, 4096),
    "meta-llama/llama-2-13b-chat-hf": (13.0e9, 40, 5120),
    "smollm2-135m-instruct": (1.35e8, 30, 576),
    "huggingfacetb/smollm2-135m-instruct": (1.35e8, 30, 576),
}


@dataclass(frozen=True)
class ModelShape:
    params: float
    layers: int
    hidden: int
    source: str  # "known", "config", "name", "default"


@lru_cache(maxsize=256)
def model_shape(model_id: str) -> ModelShape:
    """Parameters, layers and hidden size of a model id or local folder, without loading weights."""
    key = model_id.lower()
    if key in KNOWN_MODELS:
        p, l, h = KNOWN_MODELS[key]
        return ModelShape(p, l, h, "known")
    cfg_path = Path(model_id).expanduser() / "config.json"
    if cfg_path.exists():
        try:
            cfg = json.loads(cfg_path.read_text())
            return _shape_from_config(cfg)
        except (ValueError, KeyError, TypeError):
            pass
    m = re.search(r"(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", key)
    if m:
        p = float(m.group(1)) * (1e9 if m.group(2) == "b" else 1e6)
        return _shape_from_params(p, "name")
    return _shape_from_params(7e9, "default")


def _shape_from_params(p: float, source: str) -> ModelShape:
    layers = 32 if p >= 3e9 else 24 if p >= 5e8 else 16
    hidden = max(64, int(math.sqrt(p / (12 * layers)) // 64 * 64))
    return ModelShape(p, layers, hidden, source)


def _shape_from_config(cfg: dict[str, Any]) -> ModelShape:
    h = cfg.get("hidden_size") or cfg.get("n_embd") or cfg["d_model"]
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg["num_layers"]
    vocab = cfg.get("vocab_size", 32000)
    inter = cfg.get("intermediate_size") or 4 * h
    heads = cfg.get("num_attention_heads") or cfg.get("n_head") or 1
    kv = cfg.get("num_key_value_heads") or heads
    attn = h * h * 2 + 2 * h * (h * kv // heads)
    mlp = 3 * h * inter if cfg.get("intermediate_size") else 2 * h * inter
    tied = cfg.get("tie_word_embeddings", True)
    p = layers * (attn + mlp) + vocab * h * (1 if tied else 2)
    return ModelShape(float(p), int(layers), int(h), "config")


@dataclass
class Estimate:
    """What one stage is expected to cost."""

    seconds: float
    gpus: float  # GPUs held (fraction, 1, or FSDP workers)
    memory_gb: float  # peak per GPU (or per process on CPU)
    detail: dict[str, float]

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.gpus / 3600.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gpu_hours": self.gpu_hours}


def dtype_bytes(spec, profile: GpuProfile) -> int:
    dtype = spec.model.dtype
    if dtype == "auto":
        return 4 if profile.name.startswith("CPU") else 2
    return 4 if dtype == "float32" else 2


def _train_cfg(cfg) -> tuple[int, int, int, int]:
    return (int(getattr(cfg, "samples", 0) or 0), int(getattr(cfg, "max_length", 256) or 256),
            int(getattr(cfg, "epochs", 1) or 1), int(getattr(cfg, "batch_size", 1) or 1))


def defence_factor(name: str) -> float:
    from harness.registry import DEFENCES

    try:
        factor = getattr(DEFENCES.get(name), "cost_factor", None)
    except Exception:  # noqa: BLE001 - unknown name: the plan shows the default factor
        factor = None
    if factor is not None:
        return float(factor)
    return DEFENCE_FACTORS.get(name, 1.0)


def train_memory_gb(shape: ModelShape, b: int, batch: int, length: int, factor: float = 1.0) -> tuple[float, float]:
    """(sharded-able state, activations) in GB for full-parameter training."""
    state = shape.params * 4 * b
    act = batch * length * shape.layers * shape.hidden * 34 * (b / 2) * max(1.0, factor)
    return state / 1e9, act / 1e9


def infer_memory_gb(shape: ModelShape, b: int, batch: int, tokens: int) -> float:
    kv = 2 * shape.layers * shape.hidden * b * batch * tokens
    return (shape.params * b + kv) / 1e9


def gpus_for(memory_gb: float, shape: ModelShape, profile: GpuProfile, fractional: bool = True) -> float:
    usable = profile.memory_gb * USABLE
    if profile.name.startswith("CPU"):
        return 0.0
    if memory_gb <= usable:
        if fractional and shape.params < FRACTIONAL_BELOW:
            return max(0.25, math.ceil(memory_gb / profile.memory_gb * 4) / 4)
        return 1.0
    return float(math.ceil(memory_gb / usable))


def fsdp_gpus(state_gb: float, act_gb: float, profile: GpuProfile) -> int:
    usable = profile.memory_gb * USABLE
    if state_gb + act_gb <= usable:
        return 1
    room = usable - act_gb
    if room <= 0:
        return 8
    return max(2, math.ceil(state_gb / room))


def _eval_seconds(spec, attack_cfg, shape: ModelShape, b: int, profile: GpuProfile) -> tuple[float, float]:
    """(seconds, KV-cache memory GB) of one pre- or post-attack evaluation."""
    n = spec.eval.samples
    bs = spec.eval.batch_size
    max_new = getattr(attack_cfg, "max_new_tokens", None) or spec.eval.max_new_tokens
    step = shape.params * b / (profile.hbm_tbps * 1e12 * 0.6)
    decode = math.ceil(n / bs) * max_new * step
    prefill = 2 * shape.params * n * PROMPT_TOKENS / (profile.tflops * 1e12 * profile.mfu)
    score = 0.0
    for key in ("harm_scorer", "toxicity_scorer"):
        scorer = getattr(spec.eval, key)
        qps = scorer.params().get("qps")
        if scorer.name == "perspective":
            score = max(score, n / float(qps or 1.0))
    extras = len(spec.eval.extra) * EXTRA_EVAL_S * shape.params / 7e9 * (989 / profile.tflops) ** 0.5
    return decode + prefill + score + extras, infer_memory_gb(shape, b, bs, PROMPT_TOKENS + max_new)


def estimate(kind: str, spec, gpu: str = "h100", workers: Optional[int] = None) -> Estimate:
    """Cost of one stage of ``spec``: ``kind`` in base, defence, pre_attack, attack, cell
    (``cell`` = attack + post-attack evaluation; ``attack`` = the training alone, FSDP stages).
    ``workers`` fixes the number of GPUs of a training stage (else the memory model picks it)."""
    from harness.config import attack_config, defence_config

    profile = GPU_PROFILES[gpu]
    if spec.model.device == "cpu":
        profile = GPU_PROFILES["cpu"]
    shape = model_shape(spec.model.id)
    b = dtype_bytes(spec, profile)
    load = STAGE_OVERHEAD_S + shape.params * b / LOAD_BPS
    detail: dict[str, float] = {"load_s": load, "params": shape.params}
    a_cfg = attack_config(spec)

    def train(cfg, factor: float) -> tuple[float, float, int]:
        samples, length, epochs, batch = _train_cfg(cfg)
        tokens = samples * length * epochs
        state, act = train_memory_gb(shape, b, batch, length, factor)
        n = workers or (fsdp_gpus(state, act, profile) if profile.tflops > 1 else 1)
        eff = 1.0 if n <= 1 else FSDP_EFFICIENCY
        secs = 6 * shape.params * tokens * factor / (profile.tflops * 1e12 * profile.mfu * n * eff)
        detail.update({f"{kind}_tokens": float(tokens), "train_s": secs})
        return secs, state / n + act, n

    if kind == "defence":
        factor = defence_factor(spec.defence.name)
        secs, mem, n = train(defence_config(spec), factor) if factor else (0.0, 0.0, 1)
        save = shape.params * b / SAVE_BPS
        total = load + secs + save
        gpus = gpus_for(mem, shape, profile) if n == 1 else float(n)
        return Estimate(total, gpus, mem, {**detail, "save_s": save})
    if kind == "attack":
        secs, mem, n = train(a_cfg, 1.0)
        save = shape.params * b / SAVE_BPS
        gpus = gpus_for(mem, shape, profile) if n == 1 else float(n)
        return Estimate(load + secs + save, gpus, mem, {**detail, "save_s": save})
    if kind in ("pre_attack", "post_attack"):
        secs, mem = _eval_seconds(spec, a_cfg, shape, b, profile)
        detail["eval_s"] = secs
        return Estimate(load + secs, gpus_for(mem, shape, profile), mem, detail)
    if kind == "base":
        secs = len(spec.eval.extra) * EXTRA_EVAL_S * shape.params / 7e9
        mem = infer_memory_gb(shape, b, spec.eval.batch_size, PROMPT_TOKENS + spec.eval.max_new_tokens)
        return Estimate(load + secs, gpus_for(mem, shape, profile), mem, {**detail, "eval_s": secs})
    if kind == "cell":
        secs, mem, n = train(a_cfg, 1.0)
        ev, ev_mem = _eval_seconds(spec, a_cfg, shape, b, profile)
        mem = max(mem, ev_mem)
        gpus = gpus_for(mem, shape, profile) if n == 1 else float(n)
        return Estimate(load + secs + ev, gpus, mem, {**detail, "eval_s": ev})
    raise ValueError(f"unknown stage kind {kind!r}")


def describe(gpu: str = "h100") -> str:
    p = GPU_PROFILES[gpu]
    return (f"cost model ({gpu}: {p.name}, {p.tflops:g} TFLOP/s x MFU {p.mfu}, {p.hbm_tbps} TB/s, "
            f"{p.memory_gb:g} GB): train = 6 x params x tokens x defence factor / throughput; "
            f"generate = batches x new tokens x weight bytes / bandwidth; + {STAGE_OVERHEAD_S:g} s start "
            f"+ load at {LOAD_BPS / 1e9:g} GB/s per stage (harness/cost.py)")
