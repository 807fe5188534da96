"""No defence: the base model as released (the reference row of every table)."""

from __future__ import annotations

from harness.api.components import ComponentConfig, Defence
from harness.api.registry import DEFENCES


@DEFENCES.register("none")
class NoDefence(Defence):
    """No defence: the undefended base model."""

    needs_data = False
    changes_model = False
    cost_factor = 0.0

    class Config(ComponentConfig):
        pass

    def apply(self, model, tokenizer, data, ctx):
        return model
