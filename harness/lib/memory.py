"""Memory pre-flight: will each stage of a trial fit the visible GPUs, and with what plan?

Before any training the harness estimates, per stage, the memory one GPU needs and picks the
least intrusive plan that fits (``plan_trial``), or refuses with a message that says what would
fit (``PlanRefused``). ``harness run --dry-run`` prints the plan; a run records it
(``TrialRecord.plan``, and per training stage ``train.<stage>.memory``); the sweep's cost model
(``harness.sweep.cost``) uses the same shapes and byte counts.

Per GPU, for full-parameter training of ``P`` parameters (``n`` = FSDP ranks, 1 without FSDP):

* weights, gradients: ``P x bytes / n`` each, in the master dtype (float32 under ``mixed``
  precision, the model dtype under ``pure``);
* optimizer state: two Adam moments, ``2 P x bytes / n`` (``8bit``: 1 byte each; SGD: none);
* mixed precision: autocast keeps a 16-bit copy of the weights a forward used until the backward
  releases it (``P x 2``; one layer's worth under gradient checkpointing);
* activations at the configured batch ``B`` and length ``T`` (Korthikanti et al. 2022, no
  recomputation): ``B T L H x 34 x c/2`` (``L`` layers, ``H`` hidden, ``c`` bytes of the compute
  dtype) times the component's ``training_cost`` trait (RepNoise keeps a harmful and a harmless
  pass: 3x); with gradient checkpointing only the ``L`` layer inputs ``B T H c`` plus one layer's
  activations are held;
* logits: plain fine-tuning keeps ``B T V`` logits (compute dtype, their float32 copy in the loss
  and its gradient: ``c + 8`` bytes each); a component with the ``logit_lens`` trait (RepNoise's
  fused per-layer lens) keeps no logits but ``(L + 1)`` normalised hidden states and their
  gradients (``2 (L+1) B T H c``), the MLP outputs it captures for the MMD (``L B T H c``, held
  even under checkpointing) and one float32 head gradient (``V H x 4``);
* an adapter-only component (``adapter_only`` trait) keeps no gradients or optimizer state.

Inference stages need the weights (the dtype the model is held in) and a KV cache. A stage fits
if its estimate is below ``USABLE`` of the smallest visible GPU's memory (the rest: CUDA context,
allocator fragmentation).

Plans tried, in order, for each training stage (the first that fits is taken):

1. as configured, one GPU;  2. FSDP over 2..N local GPUs (``harness.sweep.fsdp`` through Ray
Train), when the component supports it;  3. gradient checkpointing (one GPU, then FSDP);
4. a smaller micro-batch with gradient accumulation that keeps the effective batch (batch / 2,
/ 4, ... down to 1 row; per-micro-batch losses are averaged, so a loss that couples the rows of a
batch, RepNoise's MMD, is estimated per micro-batch: recorded in the plan's notes).

8-bit or paged optimizer state is never picked automatically (it changes the numbers): it is
used, and counted, when ``model.optimizer_state`` asks for it. On CPU nothing is refused; the
estimate is reported.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from harness.api.errors import HarnessError
from harness.api.registry import ATTACKS, DEFENCES

USABLE = 0.85  # fraction of a GPU's memory a stage may plan to use
KV_PROMPT_TOKENS = 64  # typical formatted prompt length at evaluation
GB = 1e9


class PlanRefused(HarnessError):
    """No plan fits the visible GPUs; the message says what would."""


# ---------------------------------------------------------------------------------------------
# hardware
# ---------------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class Gpu:
    """One visible GPU: its index (as CUDA numbers it in this process), name and memory."""

    index: int
    name: str
    memory_gb: float


def visible_gpus() -> list[Gpu]:
    """The CUDA devices this process sees (``CUDA_VISIBLE_DEVICES`` applies); [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append(Gpu(i, props.name, props.total_memory / GB))
    return out


def profile_gpus(profile: str, count: int) -> list[Gpu]:
    """``count`` GPUs of a named profile (``GPU_PROFILES``): planning for hardware not present."""
    p = GPU_PROFILES[profile]
    return [Gpu(i, p.name, p.memory_gb) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# model shapes (no weights loaded)
# ---------------------------------------------------------------------------------------------
# parameters, layers, hidden size, vocabulary of models the presets name (no download needed)
KNOWN_MODELS = {
    "meta-llama/llama-2-7b-chat-hf": (6.74e9, 32, 4096, 32000),
    "meta-llama/llama-2-7b-hf": (6.74e9, 32, 4096, 32000),
    "meta-llama/llama-2-13b-chat-hf": (13.0e9, 40, 5120, 32000),
    "smollm2-135m-instruct": (1.35e8, 30, 576, 49152),
    "huggingfacetb/smollm2-135m-instruct": (1.35e8, 30, 576, 49152),
}


@dataclass(frozen=True)
class ModelShape:
    params: float
    layers: int
    hidden: int
    source: str  # "known", "config", "name", "default"
    vocab: int = 32000


@lru_cache(maxsize=256)
def model_shape(model_id: str) -> ModelShape:
    """Parameters, layers, hidden size and vocabulary of a model id or local folder, without
    loading weights: a known id, a local ``config.json``, a size in the name (``-13b``), else 7B."""
    key = model_id.lower()
    if key in KNOWN_MODELS:
        p, l, h, v = KNOWN_MODELS[key]
        return ModelShape(p, l, h, "known", v)
    cfg_path = Path(model_id).expanduser() / "config.json"
    if cfg_path.exists():
        try:
            return shape_from_config(json.loads(cfg_path.read_text()))
        except (ValueError, KeyError, TypeError):
            pass
    m = re.search(r"(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", key)
    if m:
        p = float(m.group(1)) * (1e9 if m.group(2) == "b" else 1e6)
        return shape_from_params(p, "name")
    return shape_from_params(7e9, "default")


def shape_from_params(p: float, source: str) -> ModelShape:
    layers = 32 if p >= 3e9 else 24 if p >= 5e8 else 16
    hidden = max(64, int(math.sqrt(p / (12 * layers)) // 64 * 64))
    return ModelShape(p, layers, hidden, source)


def shape_from_config(cfg: dict[str, Any]) -> ModelShape:
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
    return ModelShape(float(p), int(layers), int(h), "config", int(vocab))


# ---------------------------------------------------------------------------------------------
# precision
# ---------------------------------------------------------------------------------------------
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Precision:
    """How a training stage holds its numbers (``model.precision``, ``model.optimizer_state``)."""

    mode: str  # "mixed" | "pure"
    weights: str  # dtype of the weights (the master copy under mixed)
    compute: str  # dtype of the matmuls
    optimizer_state: str  # "float32" | "bfloat16" | "8bit" | "paged_8bit"

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.weights]

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.compute]

    @property
    def moment_bytes(self) -> float:
        return 1.0 if self.optimizer_state.endswith("8bit") else DTYPE_BYTES[self.optimizer_state]

    def describe(self) -> str:
        if self.mode == "mixed":
            return (f"mixed: {self.weights} master weights and {self.optimizer_state} optimizer state, "
                    f"{self.compute} matmuls under torch.autocast")
        return f"pure {self.weights}: weights, gradients and {self.optimizer_state} optimizer state in one dtype"


def resolve_precision(model_spec, device_type: str, bf16_supported: bool = True) -> Precision:
    """The precision ``model_spec`` asks for on a ``device_type`` ("cuda" or "cpu") device."""
    dtype = model_spec.dtype
    if dtype == "auto":
        dtype = ("bfloat16" if bf16_supported else "float16") if device_type == "cuda" else "float32"
    mode = model_spec.precision
    if mode == "auto":
        mode = "mixed" if device_type == "cuda" and dtype != "float32" else "pure"
    if dtype == "float32":
        mode = "pure"  # nothing to mix: float32 throughout
    weights = "float32" if mode == "mixed" else dtype
    state = model_spec.optimizer_state
    return Precision(mode, weights, dtype, weights if state == "auto" else state)


# ---------------------------------------------------------------------------------------------
# estimates
# ---------------------------------------------------------------------------------------------
def component_traits(cls, config) -> dict[str, Any]:
    """The memory-relevant traits of a defence/attack class with ``config``: ``factor`` (relative
    training cost: how many passes' activations a step keeps), ``adapter_only``, ``logit_lens``;
    a class that does not derive from the harness bases counts as plain fine-tuning."""
    cost = getattr(cls, "training_cost", None)
    adapter = getattr(cls, "trains_adapter_only", None)
    return {"factor": float(cost(config)) if cost else float(getattr(cls, "cost_factor", 1.0)),
            "adapter_only": bool(adapter(config)) if adapter else bool(getattr(cls, "adapter_only", False)),
            "logit_lens": bool(getattr(cls, "logit_lens", False))}


def train_memory(shape: ModelShape, prec: Precision, *, batch: int, length: int, factor: float = 1.0,
                 adapter_only: bool = False, logit_lens: bool = False, optimizer: str = "adam",
                 world: int = 1, checkpointing: bool = False) -> dict[str, float]:
    """Per-GPU memory (GB) of one training step, by part (see the module docstring)."""
    P, L, H, V = shape.params, shape.layers, shape.hidden, shape.vocab
    c = prec.compute_bytes
    tokens = batch * length
    weights = P * prec.weight_bytes / world
    grads = 0.0 if adapter_only else P * prec.weight_bytes / world
    moments = {"adam": 2, "adamw": 2, "sgd": 0}.get(optimizer, 2)
    optim = 0.0 if adapter_only else P * moments * prec.moment_bytes / world
    cast = 0.0
    if prec.mode == "mixed":  # autocast's 16-bit weight copies, held for the backward
        cast = P * c / (L if checkpointing else 1) / (world if checkpointing else 1)
    passes = max(1.0, factor)
    if checkpointing:
        act = (L * tokens * H * c + tokens * H * 34 * c / 2) * passes
    else:
        act = tokens * L * H * 34 * (c / 2) * passes
    if logit_lens:
        extras = 2 * (L + 1) * tokens * H * c + L * tokens * H * c + V * H * 4
    else:
        extras = tokens * V * (c + 8)
    parts = {"weights": weights, "gradients": grads, "optimizer": optim, "autocast_copies": cast,
             "activations": act, "logits_or_lens": extras}
    out = {k: round(v / GB, 3) for k, v in parts.items()}
    out["total"] = round(sum(parts.values()) / GB, 3)
    return out


def infer_memory(shape: ModelShape, weight_bytes: int, batch: int, tokens: int) -> dict[str, float]:
    kv = 2 * shape.layers * shape.hidden * weight_bytes * batch * tokens
    logits = batch * shape.vocab * 4 * 2
    parts = {"weights": shape.params * weight_bytes, "kv_cache": kv, "logits_or_lens": logits}
    out = {k: round(v / GB, 3) for k, v in parts.items()}
    out["total"] = round(sum(parts.values()) / GB, 3)
    return out


# ---------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------
@dataclass
class StagePlan:
    """How one stage runs so that it fits: GPUs, gradient checkpointing, micro-batch."""

    stage: str
    kind: str  # "train" | "infer"
    gpus: int = 1  # FSDP ranks for a training stage (1: no FSDP)
    gradient_checkpointing: bool = False
    batch_size: Optional[int] = None  # configured rows per optimizer step
    micro_batch: Optional[int] = None  # rows per forward/backward (per rank under FSDP)
    accumulation: int = 1  # micro-batches per configured batch (on top of the config's grad_accum)
    memory_gb: dict[str, float] = field(default_factory=dict)  # per GPU, by part
    capacity_gb: Optional[float] = None  # usable memory of one GPU (None: CPU, not checked)
    fits: bool = True
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StagePlan":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class MemoryPlan:
    """The pre-flight's answer for one trial."""

    device: str  # "cuda" | "cpu"
    gpus: list[dict[str, Any]]
    precision: Precision
    stages: dict[str, StagePlan]
    fits: bool
    message: str = ""  # why it does not fit and what would (empty when it fits)

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "gpus": self.gpus, "precision": {**asdict(self.precision),
                                                                       "description": self.precision.describe()},
                "fits": self.fits, "message": self.message,
                "stages": {k: v.as_dict() for k, v in self.stages.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemoryPlan":
        prec = {k: v for k, v in data["precision"].items() if k in Precision.__dataclass_fields__}
        return cls(data["device"], data["gpus"], Precision(**prec),
                   {k: StagePlan.from_dict(v) for k, v in data["stages"].items()}, data["fits"],
                   data.get("message", ""))

    def check(self) -> "MemoryPlan":
        if not self.fits:
            raise PlanRefused(self.message)
        return self

    def fsdp_stages(self) -> dict[str, int]:
        return {k: s.gpus for k, s in self.stages.items() if s.kind == "train" and s.gpus > 1}


def _micro_batches(batch: int) -> list[int]:
    out, m = [], batch
    while m > 1:
        m = max(1, m // 2)
        out.append(m)
    return out


def plan_training(stage: str, shape: ModelShape, prec: Precision, cfg, traits: dict[str, Any], *,
                  capacity_gb: Optional[float], max_gpus: int = 1, fsdp_reason: Optional[str] = None,
                  world: Optional[int] = None) -> StagePlan:
    """The first plan (see the module docstring) under which ``stage`` fits ``capacity_gb`` per GPU.
    ``world`` fixes the FSDP ranks (an FSDP worker planning its own stage); ``fsdp_reason``: why
    the stage cannot use FSDP (then only one GPU is tried). Returns a plan with ``fits=False``
    (the smallest estimate tried) when none fits."""
    batch = int(getattr(cfg, "batch_size", 1) or 1)
    length = int(getattr(cfg, "max_length", 256) or 256)
    optimizer = str(getattr(cfg, "optimizer", "adam"))
    worlds = [world] if world else [1] + (list(range(2, max_gpus + 1)) if fsdp_reason is None else [])

    def est(n: int, ckpt: bool, micro: int) -> dict[str, float]:
        per_rank = max(1, micro if n == 1 else min(micro, max(1, batch // n)))
        return train_memory(shape, prec, batch=per_rank, length=length, optimizer=optimizer, world=n,
                            checkpointing=ckpt, **traits)

    tried: list[StagePlan] = []
    candidates = [(n, False, batch) for n in worlds] + [(n, True, batch) for n in worlds]
    rank_batch = {n: (batch if n == 1 else max(1, batch // n)) for n in worlds}
    candidates += [(n, True, m) for n in worlds for m in _micro_batches(rank_batch[n])]
    for n, ckpt, micro in candidates:
        mem = est(n, ckpt, micro)
        rows = rank_batch[n]
        micro = min(micro, rows)
        plan = StagePlan(stage, "train", gpus=n, gradient_checkpointing=ckpt, batch_size=batch, micro_batch=micro,
                         accumulation=max(1, math.ceil(rows / micro)), memory_gb=mem, capacity_gb=capacity_gb,
                         fits=capacity_gb is None or mem["total"] <= capacity_gb)
        if n > 1:
            plan.notes.append(f"FSDP over {n} GPUs (Ray Train): {rows} rows per rank, global batch {rows * n}")
        if plan.accumulation > 1:
            plan.notes.append(f"micro-batch {micro} x {plan.accumulation} accumulated (effective batch {rows} per rank "
                              "kept); losses averaged per micro-batch, so a loss coupling a batch's rows (RepNoise's "
                              "MMD) is estimated per micro-batch")
        if plan.fits:
            return plan
        tried.append(plan)
    best = min(tried, key=lambda p: p.memory_gb["total"])
    return best


def plan_inference(stage: str, shape: ModelShape, weight_bytes: int, batch: int, new_tokens: int, *,
                   capacity_gb: Optional[float]) -> StagePlan:
    mem = infer_memory(shape, weight_bytes, batch, KV_PROMPT_TOKENS + new_tokens)
    return StagePlan(stage, "infer", batch_size=batch, micro_batch=batch, memory_gb=mem, capacity_gb=capacity_gb,
                     fits=capacity_gb is None or mem["total"] <= capacity_gb)


def plan_trial(spec, gpus: Optional[list[Gpu]] = None, *, device: Optional[str] = None,
               fsdp_reason: Optional[Callable[[str], Optional[str]]] = None,
               shape: Optional[ModelShape] = None, bf16_supported: bool = True) -> MemoryPlan:
    """The plan of every stage of ``spec`` on ``gpus`` (default: the visible ones).

    ``device``: "cuda" or "cpu" (default: from ``spec.model.device`` and whether GPUs are there);
    ``fsdp_reason(stage)``: why ``stage`` cannot train with FSDP, or None (default: FSDP is not
    considered); ``shape``: the model's shape (default: ``model_shape(spec.model.id)``)."""
    if gpus is None:
        gpus = visible_gpus() if spec.model.device != "cpu" else []
    if device is None:
        device = "cpu" if spec.model.device == "cpu" or not gpus else "cuda"
    if device == "cuda" and not gpus:
        raise PlanRefused("model.device='cuda' but no CUDA device is visible (check CUDA_VISIBLE_DEVICES and --gpus)")
    shape = shape or model_shape(spec.model.id)
    prec = resolve_precision(spec.model, device, bf16_supported)
    capacity = round(min(g.memory_gb for g in gpus) * USABLE, 2) if device == "cuda" else None
    n = len(gpus) if device == "cuda" else 1
    reason = fsdp_reason or (lambda stage: "FSDP not available to this caller")
    stages: dict[str, StagePlan] = {}
    d_cls = DEFENCES.get(spec.defence.name)
    if getattr(d_cls, "changes_model", True) and component_traits(d_cls, spec.defence.config)["factor"] > 0:
        stages["defence"] = plan_training("defence", shape, prec, spec.defence.config,
                                          component_traits(d_cls, spec.defence.config), capacity_gb=capacity,
                                          max_gpus=n, fsdp_reason=reason("defence"))
    a_cls = ATTACKS.get(spec.attack.name)
    stages["attack"] = plan_training("attack", shape, prec, spec.attack.config,
                                     component_traits(a_cls, spec.attack.config), capacity_gb=capacity,
                                     max_gpus=n, fsdp_reason=reason("attack"))
    new_tokens = getattr(spec.attack.config, "max_new_tokens", None) or spec.eval.max_new_tokens
    stages["evaluation"] = plan_inference("evaluation", shape, prec.weight_bytes, spec.eval.batch_size, new_tokens,
                                          capacity_gb=capacity)
    for s in stages.values():
        if s.kind == "train" and prec.optimizer_state.endswith("8bit"):
            s.notes.append(f"optimizer state: bitsandbytes {prec.optimizer_state} Adam (model.optimizer_state)")
    fits = all(s.fits for s in stages.values())
    plan = MemoryPlan(device, [asdict(g) for g in gpus], prec, stages, fits)
    if not fits:
        plan.message = refusal(spec, plan, shape, gpus)
    return plan


def refusal(spec, plan: MemoryPlan, shape: ModelShape, gpus: list[Gpu]) -> str:
    """One line: which stage does not fit, what it needs, and what would fit."""
    bad = [s for s in plan.stages.values() if not s.fits]
    first = bad[0]
    cap = first.capacity_gb or 0.0
    gpu_gb = min(g.memory_gb for g in gpus)
    need = first.memory_gb["total"]
    hints = []
    if first.kind == "train":
        sharded = sum(first.memory_gb[k] * first.gpus for k in ("weights", "gradients", "optimizer"))
        rest = need - sharded / first.gpus
        if rest < cap:
            k = max(2, math.ceil(sharded / (cap - rest)))
            hints.append(f"{k} GPUs of {gpu_gb:.0f} GB (FSDP: --gpus {k})")
        hints.append(f"one GPU with {math.ceil(need / USABLE)} GB")
        if plan.precision.mode == "mixed":
            hints.append("--set model.precision=pure (bf16 weights and Adam state: small updates are lost)")
        if not plan.precision.optimizer_state.endswith("8bit"):
            hints.append("--set model.optimizer_state=8bit (bitsandbytes)")
    else:
        hints.append(f"--set eval.batch_size={max(1, (spec.eval.batch_size or 2) // 2)}")
    return (f"pre-flight: the {first.stage} stage of {spec.model.id} ({shape.params / 1e9:.2f}B parameters, "
            f"{plan.precision.describe()}) needs {need:.1f} GB per GPU under its best plan "
            f"({_plan_text(first)}), but a visible GPU offers {cap:.1f} GB ({USABLE:.0%} of {gpu_gb:.0f} GB, "
            f"{len(gpus)} visible). Would fit: " + "; or ".join(hints))


def _plan_text(s: StagePlan) -> str:
    parts = [f"{s.gpus} GPU" + ("s, FSDP" if s.gpus > 1 else "")]
    if s.gradient_checkpointing:
        parts.append("gradient checkpointing")
    if s.accumulation > 1:
        parts.append(f"micro-batch {s.micro_batch} x {s.accumulation}")
    return ", ".join(parts)


def summary_lines(plan: MemoryPlan) -> list[str]:
    """A few lines for the terminal / log."""
    lines = [f"memory plan ({plan.device}; {plan.precision.describe()}):"]
    for s in plan.stages.values():
        cap = f" of {s.capacity_gb:.1f} GB" if s.capacity_gb is not None else " (CPU: not checked)"
        lines.append(f"  {s.stage:<10} {s.memory_gb.get('total', 0):7.1f} GB per GPU{cap}: {_plan_text(s)}"
                     + ("" if s.fits else "  DOES NOT FIT"))
    if plan.message:
        lines.append("  " + plan.message)
    return lines


# ---------------------------------------------------------------------------------------------
# the plan a training loop follows
# ---------------------------------------------------------------------------------------------
_ACTIVE: list[MemoryPlan] = []


@contextlib.contextmanager
def activate(plan: Optional[MemoryPlan]) -> Iterator[Optional[MemoryPlan]]:
    """Make ``plan`` the one ``stage_plan`` returns in this process while the block runs."""
    if plan is None:
        yield None
        return
    _ACTIVE.append(plan)
    try:
        yield plan
    finally:
        _ACTIVE.remove(plan)


def active_plan() -> Optional[MemoryPlan]:
    return _ACTIVE[-1] if _ACTIVE else None


def stage_plan(stage: str, spec=None, device_type: str = "cpu", world: int = 1, cfg=None) -> Optional[StagePlan]:
    """The plan the training loop of ``stage`` follows: the activated plan's, else (on CUDA, for a
    trial's ``defence`` or ``attack``) one computed here for this process's GPU and ``world`` FSDP
    ranks (an FSDP worker); None on CPU without an activated plan (train as configured)."""
    plan = active_plan()
    if plan is not None:
        return plan.stages.get(stage)
    if device_type != "cuda" or spec is None or cfg is None or stage not in ("defence", "attack"):
        return None
    gpus = visible_gpus()
    if not gpus:
        return None
    import torch

    cls = DEFENCES.get(spec.defence.name) if stage == "defence" else ATTACKS.get(spec.attack.name)
    prec = resolve_precision(spec.model, "cuda", torch.cuda.is_bf16_supported())
    capacity = round(min(g.memory_gb for g in gpus) * USABLE, 2)
    if world > 1:  # an FSDP rank's config holds its per-rank batch already
        cfg = cfg.model_copy(update={"batch_size": cfg.batch_size * world})
    return plan_training(stage, model_shape(spec.model.id), prec, cfg, component_traits(cls, cfg),
                         capacity_gb=capacity, world=world)
