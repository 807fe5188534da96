"""Weight noise: add Gaussian noise of relative scale ``sigma`` to every weight matrix.

    W <- W + sigma * std(W) * N(0, I)

Not a published defence; a template showing the whole contract of a third-party defence: a
registered name (entry point ``harness.defences``), a typed ``Config`` with defaults, and
``apply(model, tokenizer, data, ctx) -> model``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from harness.api import ComponentConfig, Defence


class WeightNoise(Defence):
    """Example plug-in defence: Gaussian noise on every weight matrix (no training, no data)."""

    needs_data = False

    class Config(ComponentConfig):
        sigma: float = Field(0.01, ge=0)

    @torch.no_grad()
    def apply(self, model, tokenizer, data, ctx):
        gen = ctx.generator()
        for p in model.parameters():
            if p.ndim == 2:
                noise = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
                p.add_(noise * self.config.sigma * p.float().std().to(p.dtype))
        return model
