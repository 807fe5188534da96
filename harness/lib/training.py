"""The one training loop every defence and attack uses.

Adam (the paper's optimiser; AdamW/SGD selectable), cosine (or linear/constant) schedule with
linear warm-up over ``warmup_ratio`` of the steps, gradient clipping, gradient accumulation,
bf16 autocast on CUDA, the ``freeze_layers`` depth ablation, a progress bar, and NaN/inf
detection: a non-finite loss raises ``DivergedError`` (stage + step) before the optimiser
applies it, so a broken model is never saved.
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
from harness.lib.context import StageContext
from harness.api.errors import DivergedError
from harness.lib.layers import decoder_layers

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


def make_optimizer(params: Sequence[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
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


def autocast(ctx: StageContext):
    if ctx.use_autocast:
        return torch.autocast(device_type=ctx.device.type, dtype=ctx.dtype)
    return contextlib.nullcontext()


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
    total_micro = len(batches) * cfg.epochs
    total = max(1, math.ceil(total_micro / cfg.grad_accum))
    opt = make_optimizer(trainable, cfg)
    sched = make_scheduler(opt, cfg, total)
    model.train()
    stats = TrainStats()
    scale = 1.0 / cfg.grad_accum
    start = time.perf_counter()

    def default_step(m, batch, s):
        with autocast(ctx):
            out = _as_dict(loss_fn(m, batch))
        loss = out["loss"]
        if torch.isfinite(loss.detach()).all():
            (loss * s).backward()
        return {k: (float(v.detach()) if torch.is_tensor(v) else v) for k, v in out.items()}

    step = step_fn or default_step
    bar = tqdm(total=total_micro, desc=desc or ctx.stage, disable=not ctx.progress, leave=False,
               dynamic_ncols=True)
    try:
        for _ in range(cfg.epochs):
            for batch in batches:
                out = step(model, batch, scale)
                loss = float(out["loss"])
                stats.steps += 1
                if not math.isfinite(loss):
                    opt.zero_grad(set_to_none=True)
                    raise DivergedError(ctx.stage, stats.steps, loss)
                stats.losses.append(loss)
                for key, value in out.items():
                    if key != "loss" and isinstance(value, (int, float)):
                        stats.extra.setdefault(key, []).append(float(value))
                if stats.steps % cfg.grad_accum == 0 or stats.steps == total_micro:
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
    ctx.stats["train"] = stats.summary()  # the record's train.<stage> (the only place it is set)
    ctx.log.info("%s: %d optimizer steps in %.1fs, loss %.4f -> %.4f", ctx.stage, stats.optimizer_steps,
                 stats.seconds, stats.losses[0], stats.losses[-1])
    return stats
