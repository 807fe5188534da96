"""Security vectors (Zhou et al., "Making Harmful Behaviors Unlearnable for Large Language
Models", 2023): absorb the harmful behaviour into a separate LoRA adapter, keep that adapter
switched on and frozen while the model is fine-tuned, and switch it off for use.

Training: a LoRA adapter phi (peft; rank 8, lora_alpha 32, dropout 0.1, on peft's default target
modules of the architecture) minimises CE(harmful answer | question) on the harmful data with the
base weights theta fixed (answer tokens only, ``loss_on: response``; the authors' code trains on
the whole text padded with EOS, labels = input ids: ``loss_on: all``, docs/fidelity.md). Attack: theta is fine-tuned on L(theta, phi) with phi active and frozen;
since theta + phi already fits harmful text, the attack's gradient on theta is small ("nothing
left to learn"). Evaluation: the model is theta' alone (adapter disabled).

Defaults (the paper's): lr 1e-3, 1 epoch; the rest as the RepNoise defence stage (Adam, cosine
schedule with 10% warm-up, batch 8, 256 tokens, 10k BeaverTails ``30k_train`` pairs).

Saving: ``save_defended`` writes the base weights (without any LoRA wrapper) as an ordinary
checkpoint plus the adapter in ``security_vector/`` inside it; ``load_defended`` loads the base
and attaches the adapter again (active, frozen).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from pydantic import Field

from defences._common import (SFTDefenceConfig, lm_loss, make_sft_batches, model_device, require, train_loop,
                              training_order)
from harness.api.components import Defence
from harness.api.errors import ConfigError
from harness.api.registry import DEFENCES
from harness.lib.checkpoints import MARKER
from harness.lib.store import atomic_write_json

ADAPTER_DIR = "security_vector"
ADAPTER_NAME = "default"


def load_checkpoint(model_spec, folder, device, dtype):
    """``harness.lib.models.load_checkpoint``, imported when a defended model is loaded (torch,
    transformers): importing this module to validate the Config needs neither."""
    from harness.lib.models import load_checkpoint as load

    return load(model_spec, folder, device, dtype)


def adapter_parameters(model) -> list:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def _lora_layers(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def set_adapter_enabled(model, enabled: bool) -> None:
    """Switch the security-vector adapter on or off (works on the PeftModel or its inner model)."""
    layers = _lora_layers(model)
    if not layers:
        raise ConfigError("security_vectors: the model carries no security-vector adapter (was it loaded with "
                          "SecurityVectors.load_defended?)")
    for layer in layers:
        layer.enable_adapters(enabled)


def freeze_adapter(model) -> None:
    """Adapter frozen, base weights trainable: the state the attack must see."""
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" not in name)


def clean_base_state_dict(model) -> dict[str, Any]:
    """The base model's weights under their original names (LoRA modules stripped)."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    out = {}
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


@DEFENCES.register("security_vectors")
class SecurityVectors(Defence):
    """Security vectors: a frozen LoRA adapter that absorbs harmful fine-tuning, disabled at use."""

    cost_factor = 0.7  # forward + backward through frozen weights, no weight gradients
    adapter_only = True

    class Config(SFTDefenceConfig):
        lr: float = Field(1e-3, gt=0)
        r: int = Field(8, gt=0)
        lora_alpha: int = Field(32, gt=0)
        lora_dropout: float = Field(0.1, ge=0, lt=1)
        target_modules: Optional[list[str]] = None  # None: peft's default for the architecture

    def _wrap(self, model):
        from harness.lib.layers import UnsupportedArchitecture, _arch

        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(model, PeftModel) or _lora_layers(model):
            raise ConfigError("security_vectors: the model already carries an adapter")
        cfg = self.config
        lora = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.target_modules, task_type="CAUSAL_LM")
        try:
            return get_peft_model(model, lora)
        except ValueError as exc:
            raise UnsupportedArchitecture(f"security_vectors: peft cannot place LoRA on {_arch(model)} ({exc}); set "
                                          "defence.target_modules to the names of its linear layers") from exc

    def apply(self, model, tokenizer, data, ctx):
        cfg = self.config
        data = require(data, ("response",), "security_vectors")
        batches = make_sft_batches(tokenizer, training_order(data, cfg, ctx), "response", cfg.batch_size,
                                   cfg.max_length, device=model_device(model), loss_on=cfg.loss_on,
                                   separator=cfg.separator, template=cfg.template)
        peft_model = self._wrap(model)
        train_loop(peft_model, batches, cfg, ctx, loss_fn=lm_loss, params=adapter_parameters(peft_model),
                   desc="security_vectors")
        set_adapter_enabled(peft_model, True)
        freeze_adapter(peft_model)
        return peft_model

    def prepare_attack(self, model, tokenizer, ctx):
        """Adapter on and frozen; only the base weights are trainable. (``train_loop`` trains the
        parameters that require grad when it starts, so the adapter stays untouched.)"""
        set_adapter_enabled(model, True)
        freeze_adapter(model)
        return model

    def prepare_eval(self, model, tokenizer, ctx):
        """Adapter off: the (attacked) base weights alone are scored."""
        set_adapter_enabled(model, False)
        return model

    def save_defended(self, model, tokenizer, folder, meta: dict[str, Any] | None = None):
        """Base weights as an ordinary checkpoint, the adapter in ``security_vector/`` inside it,
        then the completion marker (written last, as ``harness.lib.checkpoints.save_model`` does)."""
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise ConfigError("security_vectors: save_defended needs the model apply() returned (a PeftModel)")
        folder = Path(folder)
        tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        model.get_base_model().save_pretrained(tmp, state_dict=clean_base_state_dict(model), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        atomic_write_json(folder / MARKER, {"saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "adapter": ADAPTER_DIR,
                                            **(meta or {})})
        return folder

    def load_defended(self, folder, model_spec, device, dtype):
        """The base checkpoint with the security vector attached again (active, frozen)."""
        base, tokenizer = load_checkpoint(model_spec, folder, device, dtype)
        return self.attach(base, Path(folder) / ADAPTER_DIR), tokenizer

    @staticmethod
    def attach(base, adapter_folder):
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(adapter_folder), is_trainable=False)
        set_adapter_enabled(model, True)
        freeze_adapter(model)
        return model
