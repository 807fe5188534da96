"""Vaccine (Huang et al., "Vaccine: Perturbation-aware Alignment for Large Language Models
against Harmful Fine-tuning Attack", NeurIPS 2024): alignment on refusals that stays aligned when
the hidden representations drift, as a later harmful fine-tune makes them.

Per step, on a batch of (question, refusal) text (SAM-like, two forward/backward passes):

1. e_l = grad of L(theta) w.r.t. h_l, the output of decoder layer l, for every layer;
2. eps_l = rho * e_l / ||(e_1, ..., e_L)||  (one norm over all layers, + 1e-7);
3. update theta with the gradient of L(theta; h_l -> h_l + eps_l for every l), the loss under
   the perturbation (the first pass leaves no weight gradient behind).

L is the token cross-entropy on the refusal. Defaults: rho 1; training as the RepNoise defence
stage for comparability (lr 2e-5, Adam, cosine schedule with 10% warm-up, batch 8, 1 epoch,
256 tokens, 10k BeaverTails ``30k_train`` questions with refusals; full-parameter rather than the
paper's LoRA).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from pydantic import Field

from defences._common import DataDefenceConfig, lm_loss, make_sft_batches, model_device, require, shuffled
from harness.api.components import Defence
from harness.lib.layers import decoder_layers
from harness.api.registry import DEFENCES
from harness.lib.training import autocast, train_loop


class LayerOutputHooks:
    """Forward hooks on every decoder layer: record the outputs, or add a perturbation to them."""

    def __init__(self, model):
        self.layers = decoder_layers(model)
        self.mode: Optional[str] = None  # None, "record" or "perturb"
        self.outputs: list[Optional[torch.Tensor]] = [None] * len(self.layers)
        self.perturbations: list[Optional[torch.Tensor]] = [None] * len(self.layers)
        self.handles = []

    def __enter__(self):
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        self.outputs = [None] * len(self.layers)
        self.perturbations = [None] * len(self.layers)

    def _hook(self, index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if self.mode == "record":
                self.outputs[index] = hidden
            elif self.mode == "perturb" and self.perturbations[index] is not None:
                hidden = hidden + self.perturbations[index].to(hidden.dtype)
                return (hidden, *output[1:]) if isinstance(output, (tuple, list)) else hidden
            return None
        return hook


def perturbations(grads: list[Optional[torch.Tensor]], rho: float) -> list[Optional[torch.Tensor]]:
    """rho * g_l / ||(g_1..g_L)||, one norm over all layers (as the Vaccine code does)."""
    norms = [g.float().norm(p=2) for g in grads if g is not None]
    if not norms:
        return [None] * len(grads)
    total = torch.stack(norms).norm(p=2)
    scale = rho / (total + 1e-7)
    return [(g.detach() * scale).to(g.dtype) if g is not None else None for g in grads]


@DEFENCES.register("vaccine")
class Vaccine(Defence):
    """Vaccine: perturbation-aware alignment on refusals (two passes per step)."""

    class Config(DataDefenceConfig):
        rho: float = Field(1.0, ge=0)

    def apply(self, model, tokenizer, data, ctx):
        cfg = self.config
        data = require(data, ("refusal",), "vaccine")
        batches = make_sft_batches(tokenizer, shuffled(data, ctx.generator(0)), "refusal", cfg.batch_size,
                                   cfg.max_length, device=model_device(model))
        with LayerOutputHooks(model) as hooks:
            def step(m, batch, scale):
                hooks.mode = "record"
                try:
                    with autocast(ctx):
                        clean = lm_loss(m, batch)
                finally:
                    hooks.mode = None
                outs = hooks.outputs
                hooks.outputs = [None] * len(outs)
                if not math.isfinite(float(clean.detach())):
                    return {"loss": float(clean.detach())}
                wanted = [i for i, o in enumerate(outs) if o is not None and o.requires_grad]
                grads: list[Optional[torch.Tensor]] = [None] * len(outs)
                if wanted:
                    got = torch.autograd.grad(clean, [outs[i] for i in wanted], allow_unused=True)
                    for i, g in zip(wanted, got):
                        grads[i] = g
                del outs
                hooks.perturbations = perturbations(grads, cfg.rho)
                hooks.mode = "perturb"
                try:
                    with autocast(ctx):
                        loss = lm_loss(m, batch)
                finally:
                    hooks.mode = None
                    hooks.perturbations = [None] * len(hooks.layers)
                if torch.isfinite(loss.detach()):
                    (loss * scale).backward()
                return {"loss": float(loss.detach()), "clean_loss": float(clean.detach())}

            stats = train_loop(model, batches, cfg, ctx, step_fn=step, desc="vaccine")
        ctx.stats["train"] = stats.summary()
        return model
