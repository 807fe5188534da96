"""Random initialisation (a baseline of Rosati et al., NeurIPS 2024, "Representation Noising"):
the same architecture with freshly initialised weights, the lower bound of harm (a model that
knows nothing cannot be made harmful by a short attack either).

No loss and no data: theta ~ the architecture's own initialiser (``config.initializer_range``),
seeded from the trial seed. Defaults: none to set.
"""

from __future__ import annotations

import copy

from harness.api.components import ComponentConfig, Defence
from harness.api.registry import DEFENCES


@DEFENCES.register("random_init")
class RandomInit(Defence):
    """Random initialisation: the same architecture with fresh random weights."""

    needs_data = False
    cost_factor = 0.0  # no training: one fresh initialisation

    class Config(ComponentConfig):
        pass

    def apply(self, model, tokenizer, data, ctx):
        import torch

        from harness.lib.layers import _arch, _base

        base = _base(model)
        config = copy.deepcopy(base.config)
        if hasattr(config, "quantization_config"):  # e.g. a GGUF-loaded model; the copy is plain
            delattr(config, "quantization_config")
        param = next(base.parameters())
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(ctx.seed)
                fresh = type(base)(config)
        except Exception as exc:  # pragma: no cover - depends on the architecture
            raise RuntimeError(f"random_init: cannot build a fresh {_arch(model)}: {exc}") from exc
        fresh.to(device=param.device, dtype=param.dtype)
        if getattr(base, "generation_config", None) is not None:
            fresh.generation_config = copy.deepcopy(base.generation_config)
        fresh.eval()
        ctx.stats["random_init"] = {"parameters": sum(p.numel() for p in fresh.parameters()), "seed": ctx.seed}
        return fresh
