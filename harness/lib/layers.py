"""Finding the parts of a Hugging Face causal LM that defences need, across architectures.

Supported: Llama, Mistral, Qwen2/Qwen3, Gemma, Phi-3 and other ``model.model.layers`` models;
GPT-2 / GPT-J / GPT-Neo style ``transformer.h``; GPT-NeoX ``gpt_neox.layers``; OPT
``model.decoder.layers``. Anything else fails with a message naming the architecture.
"""

from __future__ import annotations

import torch

from harness.api.errors import ConfigError


class UnsupportedArchitecture(ConfigError):
    pass


def _base(model):
    # PEFT wrappers keep the HF model at base_model.model
    inner = getattr(model, "base_model", None)
    if inner is not None and hasattr(inner, "model") and inner is not model and type(inner).__name__.endswith("Model") and hasattr(inner.model, "config"):
        return inner.model
    return model


def _arch(model) -> str:
    cfg = getattr(model, "config", None)
    names = getattr(cfg, "architectures", None) or [type(model).__name__]
    return f"{names[0]} (model_type={getattr(cfg, 'model_type', '?')})"


def decoder_layers(model) -> torch.nn.ModuleList:
    m = _base(model)
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "model.language_model.layers"):
        obj = m
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj
    raise UnsupportedArchitecture(f"cannot find the decoder layers of {_arch(model)}; supported: Llama, "
                                  "Mistral, Qwen2, Gemma, GPT-2, GPT-NeoX, OPT-style models")


def mlp_modules(model) -> list[torch.nn.Module]:
    """The MLP (feed-forward) block of every decoder layer."""
    out = []
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
        if mlp is None and hasattr(layer, "fc1"):
            raise UnsupportedArchitecture(f"{_arch(model)}: MLP is not a single module")
        if mlp is None:
            raise UnsupportedArchitecture(f"cannot find the MLP of a decoder layer of {_arch(model)}")
        out.append(mlp)
    return out


def final_norm(model) -> torch.nn.Module:
    m = _base(model)
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm",
                 "model.language_model.norm"):
        obj = m
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.Module):
            return obj
    raise UnsupportedArchitecture(f"cannot find the final norm of {_arch(model)}")


def lm_head(model) -> torch.nn.Module:
    m = _base(model)
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    if head is None:
        raise UnsupportedArchitecture(f"cannot find the LM head of {_arch(model)}")
    return head
