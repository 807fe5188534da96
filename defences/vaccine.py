"""Vaccine (Huang et al., "Vaccine: Perturbation-aware Alignment for Large Language Models
against Harmful Fine-tuning Attack", NeurIPS 2024): alignment on refusals that stays aligned when
the hidden representations drift, as a later harmful fine-tune makes them.

Per step, on a batch of (question, refusal) text (SAM-like, two forward/backward passes):

1. e_l = grad of L(theta) w.r.t. h_l, the output of the attention module of decoder layer l
   (``perturb: attention``, as Vaccine's code and the RepNoise authors' port hook the
   ``self_attn`` modules; ``perturb: layer`` uses the whole decoder layer's output instead);
2. eps_l = rho * e_l / ||(e_1, ..., e_L)||  (one norm over all layers, + 1e-7);
3. update theta with the gradient of L(theta; h_l -> h_l + eps_l for every l), the loss under
   the perturbation. The first pass leaves no weight gradient behind, as in Vaccine's trainer
   (which zeroes the gradients between the passes); ``keep_clean_grad: true`` keeps it, as the
   RepNoise authors' port does (its first backward pass is not zeroed, so the update is the sum of
   both passes' gradients).

L is the token cross-entropy on the refusal (``train_on: refusal``, Vaccine's alignment data;
the RepNoise authors' port trains on the harmful batch: ``train_on: response``), on the answer
tokens (``loss_on: response``) or on the whole EOS-padded text as the port does (``loss_on: all``).
Defaults: rho 1, perturb attention; training as the RepNoise defence stage for comparability
(lr 2e-5, Adam, cosine schedule with 10% warm-up, batch 8, 1 epoch, 256 tokens, 10k BeaverTails
``30k_train`` questions with refusals; full-parameter rather than the paper's LoRA). The ``paper``
preset's settings are listed in docs/fidelity.md.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field

from defences._common import (SFTDefenceConfig, lm_loss, make_sft_batches, model_device, require, train_loop,
                              training_order)
from harness.api.components import Defence
from harness.api.registry import DEFENCES

if TYPE_CHECKING:  # imported where the perturbation runs: the Config validates without torch
    import torch

Perturb = Literal["attention", "layer"]
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


def perturbed_modules(model, perturb: Perturb) -> list[torch.nn.Module]:
    """The modules whose outputs Vaccine perturbs: each decoder layer's attention module
    (``self_attn`` in Llama, Qwen2, Mistral; ``attn`` in GPT-2), or each whole decoder layer."""
    import torch

    from harness.lib.layers import UnsupportedArchitecture, _arch, decoder_layers

    layers = list(decoder_layers(model))
    if perturb == "layer":
        return layers
    out = []
    for i, layer in enumerate(layers):
        module = next((getattr(layer, n) for n in ATTENTION_NAMES
                       if isinstance(getattr(layer, n, None), torch.nn.Module)), None)
        if module is None:
            raise UnsupportedArchitecture(f"vaccine: decoder layer {i} of {_arch(model)} has no attention module "
                                          f"named {', '.join(ATTENTION_NAMES)}; use defence.perturb=layer")
        out.append(module)
    return out


class OutputHooks:
    """Forward hooks on the perturbed modules: record their outputs, or add a perturbation to
    them (to the first element when a module returns a tuple, e.g. attention output + weights)."""

    def __init__(self, model, perturb: Perturb):
        self.layers = perturbed_modules(model, perturb)
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


LayerOutputHooks = OutputHooks  # the earlier name


def perturbations(grads: list[Optional[torch.Tensor]], rho: float) -> list[Optional[torch.Tensor]]:
    """rho * g_l / ||(g_1..g_L)||, one norm over all layers (as the Vaccine code does)."""
    import torch

    norms = [g.float().norm(p=2) for g in grads if g is not None]
    if not norms:
        return [None] * len(grads)
    total = torch.stack(norms).norm(p=2)
    scale = rho / (total + 1e-7)
    return [(g.detach() * scale).to(g.dtype) if g is not None else None for g in grads]


@DEFENCES.register("vaccine")
class Vaccine(Defence):
    """Vaccine: perturbation-aware alignment on refusals (two passes per step)."""

    cost_factor = 2.0  # a clean pass and a perturbed pass per step

    class Config(SFTDefenceConfig):
        rho: float = Field(1.0, ge=0)
        perturb: Perturb = "attention"
        train_on: Literal["refusal", "response"] = "refusal"
        keep_clean_grad: bool = False

    def apply(self, model, tokenizer, data, ctx):
        import torch

        from harness.lib.training import autocast

        cfg = self.config
        data = require(data, (cfg.train_on,), "vaccine")
        batches = make_sft_batches(tokenizer, training_order(data, cfg, ctx), cfg.train_on, cfg.batch_size,
                                   cfg.max_length, device=model_device(model), loss_on=cfg.loss_on,
                                   separator=cfg.separator, template=cfg.template)
        with OutputHooks(model, cfg.perturb) as hooks:
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
                if wanted and cfg.keep_clean_grad:  # the weight gradient of this pass stays (authors' port)
                    for i in wanted:
                        outs[i].retain_grad()
                    (clean * scale).backward()
                    for i in wanted:
                        grads[i] = outs[i].grad
                elif wanted:
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

            train_loop(model, batches, cfg, ctx, step_fn=step, desc="vaccine")
        return model
