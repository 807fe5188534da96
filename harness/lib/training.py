"""The one training loop every defence and attack uses.

Adam (the paper's optimiser; AdamW/SGD selectable), cosine (or linear/constant) schedule with
linear warm-up over ``warmup_ratio`` of the steps, gradient clipping, gradient accumulation,
the ``freeze_layers`` depth ablation, a progress bar, and NaN/inf detection: a non-finite loss
raises ``DivergedError`` (stage + step) before the optimiser applies it, so a broken model is
never saved.

Precision (``model.precision``, resolved by ``harness.lib.memory.resolve_precision``):

* ``mixed`` (the GPU default): the weights, their gradients and the Adam moments stay float32
  (master copies); forward and backward matmuls run in bf16 under ``torch.autocast``. An update
  ``lr x m / sqrt(v)`` of 2e-5 on a weight of size 0.05 is 4e-4 of it, below half a bf16 ulp
  (2^-9): in float32 it lands, in bf16 it rounds away. torch AMP, not ``accelerate``: the loop is
  ours (custom step functions, FSDP2 through Ray Train, fused losses that read the autocast
  dtype), autocast is the one piece ``accelerate`` would add, and it needs no extra state or
  launcher; bf16 needs no loss scaling (float16 would: not offered).
* ``pure``: weights, gradients and Adam moments all in the model dtype (``model.dtype=bfloat16``
  trains in bf16 throughout: small updates are lost; float32 on CPU).
* ``model.optimizer_state=8bit`` / ``paged_8bit``: bitsandbytes' 8-bit (paged) Adam, only when
  chosen.

Memory plan (``harness.lib.memory``): the stage's plan, when there is one, switches on gradient
checkpointing and splits each batch into micro-batches accumulated to the same effective batch.
The precision and the plan followed go into the stage's training summary (``train.<stage>``).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from harness.api.components import TrainConfig
from harness.api.errors import ConfigError, DivergedError
from harness.lib.context import StageContext
from harness.lib.layers import decoder_layers
from harness.lib.memory import Precision, StagePlan, resolve_precision, stage_plan

# loss_fn(model, batch) -> scalar loss tensor, or a dict with "loss" and other logged scalars
LossFn = Callable[[torch.nn.Module, Any], Any]
# step_fn(model, batch, scale) -> dict with "loss" (a float); it runs forward and backward itself
StepFn = Callable[[torch.nn.Module, Any, float], dict]


@dataclass
class TrainStats:
    steps: int = 0
    optimizer_steps: int = 0
    losses: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        out = {"steps": self.optimizer_steps, "micro_steps": self.steps, "seconds": round(self.seconds, 3),
               "first_loss": self.losses[0] if self.losses else None,
               "final_loss": self.losses[-1] if self.losses else None,
               "losses": [round(x, 6) for x in self.losses]}
        for key, values in self.extra.items():
            out[f"final_{key}"] = values[-1] if values else None
        return out


def make_optimizer(params: Sequence[torch.nn.Parameter], cfg: TrainConfig,
                   optimizer_state: str = "auto") -> torch.optim.Optimizer:
    """The optimiser ``cfg`` names; ``optimizer_state`` ``8bit``/``paged_8bit``: bitsandbytes' 8-bit
    (paged) Adam/AdamW instead (its moments in 8 bits)."""
    if optimizer_state in ("8bit", "paged_8bit"):
        if cfg.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"model.optimizer_state={optimizer_state!r} needs optimizer adam or adamw, not "
                              f"{cfg.optimizer!r}")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(f"model.optimizer_state={optimizer_state!r} needs the bitsandbytes package "
                              "(pip install bitsandbytes)") from None
        paged = "Paged" if optimizer_state == "paged_8bit" else ""
        cls = getattr(bnb.optim, f"{paged}{'AdamW' if cfg.optimizer == 'adamw' else 'Adam'}8bit")
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_lambda(kind: str, total: int, warmup: float, from_zero: bool = False) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            # from_zero: transformers' schedules (the authors' code), whose first step has lr 0
            return step / max(1.0, warmup) if from_zero else (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    from_zero = getattr(cfg, "warmup_from_zero", False)
    warmup = cfg.warmup_ratio * total_steps if from_zero else int(round(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.scheduler, total_steps, warmup, from_zero))


def freeze_first_layers(model: torch.nn.Module, k: int) -> None:
    """The paper's depth ablation: no gradient for the first ``k`` decoder layers."""
    if k <= 0:
        return
    layers = decoder_layers(model)
    if k > len(layers):
        raise ValueError(f"freeze_layers={k} but the model has {len(layers)} decoder layers")
    for layer in layers[:k]:
        for p in layer.parameters():
            p.requires_grad_(False)


def precision(ctx: StageContext) -> Optional[Precision]:
    """The precision the trial's spec asks for on the stage's device (None without a spec)."""
    if ctx.spec is None:
        return None
    bf16 = ctx.device.type != "cuda" or torch.cuda.is_bf16_supported()
    return resolve_precision(ctx.spec.model, ctx.device.type, bf16)


def autocast(ctx: StageContext):
    """Mixed precision: ``torch.autocast`` to the compute dtype; pure: nothing (the weights' dtype).
    Without a spec, autocast when the stage's dtype is 16-bit on CUDA."""
    prec = precision(ctx)
    if prec is not None:
        if prec.mode == "mixed":
            return torch.autocast(device_type=ctx.device.type, dtype=getattr(torch, prec.compute))
        return contextlib.nullcontext()
    if ctx.use_autocast:
        return torch.autocast(device_type=ctx.device.type, dtype=ctx.dtype)
    return contextlib.nullcontext()


def split_batch(batch: Any, parts: int) -> list[Any]:
    """``batch`` (tensors, or dicts/tuples/lists of them, split along the first dimension) as
    ``parts`` micro-batches of consecutive rows; a non-tensor leaf is given to every part."""
    def rows(x):
        if torch.is_tensor(x) and x.dim() > 0:
            return x.shape[0]
        if isinstance(x, dict):
            return next((r for r in map(rows, x.values()) if r), 0)
        if isinstance(x, (tuple, list)):
            return next((r for r in map(rows, x) if r), 0)
        return 0

    n = rows(batch)
    if parts <= 1 or n <= 1:
        return [batch]
    size = math.ceil(n / parts)
    bounds = [(i, min(n, i + size)) for i in range(0, n, size)]

    def take(x, lo, hi):
        if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == n:
            return x[lo:hi]
        if isinstance(x, dict):
            return {k: take(v, lo, hi) for k, v in x.items()}
        if isinstance(x, (tuple, list)) and not (x and all(isinstance(v, (int, float, str)) for v in x)):
            return type(x)(take(v, lo, hi) for v in x)
        return x

    return [take(batch, lo, hi) for lo, hi in bounds]


def _plan_for(ctx: StageContext, cfg: TrainConfig) -> Optional[StagePlan]:
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
    return stage_plan(ctx.stage, ctx.spec, ctx.device.type, world, cfg=cfg)


@contextlib.contextmanager
def gradient_checkpointing(model: torch.nn.Module, on: bool):
    """Recompute each decoder layer's activations in backward (transformers' own switch) while
    the block runs; restored afterwards."""
    # transformers 5 renames the switch (activation_checkpointing_*); 4.x has only gradient_checkpointing_*
    prefix = next((p for p in ("activation_checkpointing", "gradient_checkpointing")
                   if hasattr(model, f"{p}_enable")), None)
    if not on or prefix is None:
        yield False
        return
    cache = getattr(getattr(model, "config", None), "use_cache", None)
    getattr(model, f"{prefix}_enable")(**{f"{prefix}_kwargs": {"use_reentrant": False}})
    if cache is not None:
        model.config.use_cache = False
    try:
        yield True
    finally:
        getattr(model, f"{prefix}_disable")()
        if cache is not None:
            model.config.use_cache = cache


def _as_dict(out: Any) -> dict:
    return out if isinstance(out, dict) else {"loss": out}


def train_loop(
    model: torch.nn.Module,
    batches: Sequence[Any],
    cfg: TrainConfig,
    ctx: StageContext,
    *,
    loss_fn: Optional[LossFn] = None,
    step_fn: Optional[StepFn] = None,
    params: Optional[Iterable[torch.nn.Parameter]] = None,
    desc: Optional[str] = None,
) -> TrainStats:
    """Train ``model`` for ``cfg.epochs`` over ``batches`` (a list, re-iterated per epoch).

    On success the summary (``TrainStats.summary``) is also stored as ``ctx.stats["train"]``, which
    the pipeline copies into the record's ``train.<stage>``; a component calling ``train_loop``
    more than once leaves the last call's summary there."""
    if (loss_fn is None) == (step_fn is None):
        raise ValueError("train_loop needs exactly one of loss_fn or step_fn")
    freeze_first_layers(model, cfg.freeze_layers)
    trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not trainable:
        raise ValueError(f"{ctx.stage}: no trainable parameters")
    plan = _plan_for(ctx, cfg)
    parts = plan.accumulation if plan is not None else 1
    prec = precision(ctx)
    total_batches = len(batches) * cfg.epochs
    total = max(1, math.ceil(total_batches / cfg.grad_accum))
    opt = make_optimizer(trainable, cfg, ctx.spec.model.optimizer_state if ctx.spec is not None else "auto")
    sched = make_scheduler(opt, cfg, total)
    model.train()
    stats = TrainStats()
    scale = 1.0 / cfg.grad_accum
    cuda = ctx.device.type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    start = time.perf_counter()

    def default_step(m, batch, s):
        with autocast(ctx):
            out = _as_dict(loss_fn(m, batch))
        loss = out["loss"]
        if torch.isfinite(loss.detach()).all():
            (loss * s).backward()
        return {k: (float(v.detach()) if torch.is_tensor(v) else v) for k, v in out.items()}

    step = step_fn or default_step
    done = 0  # batches (effective, all micro-batches of one) so far
    bar = tqdm(total=total_batches, desc=desc or ctx.stage, disable=not ctx.progress, leave=False,
               dynamic_ncols=True)
    try:
        with gradient_checkpointing(model, bool(plan and plan.gradient_checkpointing)):
            for _ in range(cfg.epochs):
                for batch in batches:
                    micro = split_batch(batch, parts)
                    outs = []
                    for piece in micro:  # one batch as micro-batches: gradients add up to its mean
                        out = step(model, piece, scale / len(micro))
                        loss = float(out["loss"])
                        stats.steps += 1
                        if not math.isfinite(loss):
                            opt.zero_grad(set_to_none=True)
                            raise DivergedError(ctx.stage, stats.steps, loss)
                        outs.append(out)
                    done += 1
                    loss = sum(float(o["loss"]) for o in outs) / len(outs)
                    stats.losses.append(loss)
                    for key in outs[0]:
                        values = [o.get(key) for o in outs]
                        if key != "loss" and all(isinstance(v, (int, float)) for v in values):
                            stats.extra.setdefault(key, []).append(sum(float(v) for v in values) / len(values))
                    if done % cfg.grad_accum == 0 or done == total_batches:
                        if cfg.max_grad_norm:
                            norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                            if not torch.isfinite(norm):
                                opt.zero_grad(set_to_none=True)
                                raise DivergedError(ctx.stage, stats.steps, float(norm))
                        opt.step()
                        sched.step()
                        opt.zero_grad(set_to_none=True)
                        stats.optimizer_steps += 1
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
                    bar.update(1)
    finally:
        bar.close()
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
    stats.seconds = time.perf_counter() - start
    summary = stats.summary()
    if prec is not None:
        summary["precision"] = {"mode": prec.mode, "weights": prec.weights, "compute": prec.compute,
                                "optimizer_state": prec.optimizer_state}
    if plan is not None:
        summary["memory"] = {**plan.as_dict(), "peak_gb": round(torch.cuda.max_memory_allocated(ctx.device) / 1e9, 3)
                             if cuda else None}
    ctx.stats["train"] = summary  # the record's train.<stage> (the only place it is set)
    ctx.log.info("%s: %d optimizer steps in %.1fs, loss %.4f -> %.4f", ctx.stage, stats.optimizer_steps,
                 stats.seconds, stats.losses[0], stats.losses[-1])
    return stats
