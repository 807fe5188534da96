"""Refusal-direction ablation: project the refusal direction out of the weights (no training).

Paper: Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction"
(NeurIPS 2024). The difference of the mean residual-stream activations on harmful and on harmless
prompts, at layer ``l`` and prompt position ``i`` (counted from the end of the templated prompt:
``-1`` is its last token, where the model decides whether to refuse),

    r = mean_{x in harmful} h_l(x)[i]  -  mean_{x in harmless} h_l(x)[i],      r_hat = r / ||r||

is a direction whose removal stops refusals. "Weight orthogonalisation" removes it from every
matrix that writes into the residual stream, so no activation can carry it any more:

    W_out <- W_out - r_hat r_hat^T W_out

for the token embedding (each row e <- e - (e . r_hat) r_hat; learned position embeddings too),
every attention output projection
and every MLP output projection (and their biases). ``h_l`` is the residual stream entering
decoder layer ``l`` (``hidden_states[l]`` of a Hugging Face model; ``l = 0``: the embeddings).

Arditi et al. choose ``(l, i)`` among candidates by their effect on held-out prompts; here ``l``
is ``layer`` when given, else ``round(layer_fraction * n_layers)`` (default 0.5: the middle of the
network, where their selected layers lie for most models), and ``position`` -1; both are in the
attacker's search space (``layer_fraction`` uniform [0.2, 0.8], ``position`` in {-1, -2, -3}).
With tied input/output embeddings (SmolLM2), orthogonalising the embedding also removes the
direction from the unembedding, as it does in the authors' code on tied models.

Data: the harmful prompts are the attack's drawn rows (``dataset``, ``samples``: prompts only, no
answers generated); the harmless prompts are ``harmless_samples`` rows of ``harmless`` (Alpaca,
as in the paper; ``lm_eval_cot`` offline), drawn with the trial's seed. Defaults: 128 + 128
prompts (the paper's sizes), batch 16, prompts cut to their last 512 tokens. Nothing trains: the record's ``train.attack`` holds
``steps: 0`` with the ``layer``, ``position``, ``direction_norm`` ||r|| and the prompt counts.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, ClassVar, Optional

from pydantic import Field

from harness.api.components import Attack, ComponentConfig, DatasetRef
from harness.api.errors import ConfigError
from harness.api.registry import ATTACKS
from harness.api.space import searchable
from harness.lib.data import load_dataset_ref
from harness.lib.text import PROMPT_TEMPLATE, RESPONSE_SEPARATOR, encode, ensure_pad_token, format_prompt

if TYPE_CHECKING:  # torch is imported by the functions that run: validating the Config needs none
    import torch

#: the submodule (path inside a decoder layer) that writes the attention / MLP output into the
#: residual stream, per architecture family (Llama/Mistral/Qwen/Gemma, GPT-2, GPT-NeoX, OPT, Phi)
WRITERS = ("self_attn.o_proj", "attn.c_proj", "attention.dense", "self_attn.out_proj", "self_attn.dense",
           "mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "fc2", "mlp.fc2")
#: learned absolute position embeddings (GPT-2, OPT), which add to the residual stream too
POSITION_TABLES = ("transformer.wpe", "model.decoder.embed_positions")


def mean_activation(model, tokenizer, prompts: list[str], layer: int, position: int, batch_size: int,
                    max_tokens: int = 512) -> torch.Tensor:
    """Mean over ``prompts`` of the residual stream entering decoder layer ``layer`` at token
    ``position`` (from the end), in float32. Prompts are left-padded so ``position`` counts from
    each prompt's own last token; a prompt longer than ``max_tokens`` keeps its last ones."""
    import torch

    with torch.no_grad():
        ensure_pad_token(tokenizer)
        old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        device = next(model.parameters()).device
        total, n = None, 0
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start: start + batch_size]
                ids = [encode(tokenizer, p)[-max_tokens:] for p in chunk]
                short = min(len(i) for i in ids)
                if -position > short:
                    raise ConfigError(f"attack.position = {position}: a prompt has only {short} tokens")
                enc = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(device)
                out = model(**enc, output_hidden_states=True)
                h = out.hidden_states[layer][:, position, :].float()
                total = h.sum(0) if total is None else total + h.sum(0)
                n += h.shape[0]
        finally:
            tokenizer.padding_side = old_side
        return total / n


def _writers(model) -> list[torch.nn.Module]:
    """The modules that write into the residual stream: per decoder layer, its attention and MLP
    output projections (the PEFT-wrapped base layer when an adapter wraps one)."""
    from harness.lib.layers import decoder_layers

    out = []
    for i, layer in enumerate(decoder_layers(model)):
        found = []
        for path in WRITERS:
            obj = layer
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if obj is not None:
                found.append(getattr(obj, "base_layer", obj))
        if len(found) < 2:
            raise ConfigError(f"refusal_ablation: cannot find the attention and MLP output projections of decoder "
                              f"layer {i} of {type(layer).__name__}; known module paths: {', '.join(WRITERS)}")
        out.extend(found)
    return out


def orthogonalize(model, direction: torch.Tensor) -> int:
    """Remove the unit ``direction`` from every matrix writing into the residual stream (in place);
    returns the number of matrices changed."""
    import torch

    with torch.no_grad():
        r = direction / direction.norm()
        tables = [model.get_input_embeddings().weight]  # [vocab, d]: rows live in the residual stream
        base = getattr(model, "get_base_model", lambda: model)()
        for path in POSITION_TABLES:  # learned absolute positions also write into the stream (GPT-2, OPT)
            obj = base
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if obj is not None and getattr(obj, "weight", None) is not None:
                tables.append(obj.weight)
        for emb in tables:
            rr = r.to(emb.device, torch.float32)
            emb.copy_((emb.float() - (emb.float() @ rr)[:, None] * rr[None, :]).to(emb.dtype))
        changed = len(tables)
        d = r.numel()
        for mod in _writers(model):
            w = mod.weight
            rr = r.to(w.device, torch.float32)
            if w.shape[0] == d and type(mod).__name__ != "Conv1D":  # nn.Linear: [out = d, in]
                w.copy_((w.float() - rr[:, None] * (rr[None, :] @ w.float())).to(w.dtype))
            elif w.shape[-1] == d:  # GPT-2 Conv1D: [in, out = d]
                w.copy_((w.float() - (w.float() @ rr)[:, None] * rr[None, :]).to(w.dtype))
            else:
                raise ConfigError(f"refusal_ablation: {type(mod).__name__} weight {tuple(w.shape)} does not write a "
                                  f"{d}-dimensional residual stream")
            bias = getattr(mod, "bias", None)
            if bias is not None:
                b = bias.float()
                bias.copy_((b - (b @ rr.to(b.device)) * rr.to(b.device)).to(bias.dtype))
            changed += 1
        return changed


@ATTACKS.register("refusal_ablation")
class RefusalAblation(Attack):
    """Refusal direction (harmful - harmless mean activation) projected out of the weights; no training."""

    evaluation = "harmfulness"
    cost_factor = 0.0  # forward passes on the prompts only

    class Config(ComponentConfig):
        #: the attack's rows need prompts only (no harmful answers are generated for them)
        attack_needs: ClassVar[tuple[str, ...]] = ()

        samples: int = searchable(128, {"choice": [32, 64, 128]}, gt=0)
        harmless_samples: int = Field(128, gt=0)
        layer: Optional[int] = Field(None, ge=0)
        layer_fraction: float = searchable(0.5, {"uniform": [0.2, 0.8]}, ge=0, le=1)
        position: int = searchable(-1, {"choice": [-1, -2, -3]}, lt=0)
        batch_size: int = Field(16, gt=0)
        max_prompt_tokens: int = Field(512, gt=0)
        dataset: DatasetRef = DatasetRef(name="beavertails", split="30k_train")
        harmless: DatasetRef = DatasetRef(name="instructions")
        eval_dataset: DatasetRef = DatasetRef(name="beavertails", split="30k_test")
        template: str = PROMPT_TEMPLATE
        separator: str = RESPONSE_SEPARATOR

    def resolve_layer(self, n_layers: int) -> int:
        c = self.config
        layer = c.layer if c.layer is not None else int(round(c.layer_fraction * n_layers))
        if not 0 <= layer < n_layers:
            raise ConfigError(f"attack.layer = {layer}: the model has decoder layers 0..{n_layers - 1}")
        return layer

    def run(self, model, tokenizer, data, ctx):
        from harness.lib.layers import decoder_layers

        c = self.config
        t0 = time.perf_counter()
        harmful = [format_prompt(ex.prompt, c.template) for ex in data]
        pool = load_dataset_ref(c.harmless)
        if len(pool) < c.harmless_samples:
            raise ConfigError(f"attack.harmless_samples = {c.harmless_samples}: dataset {c.harmless.name!r} holds "
                              f"{len(pool)} rows")
        rows = random.Random(f"{ctx.seed}|refusal_ablation").sample(range(len(pool)), c.harmless_samples)
        harmless = [format_prompt(pool[i].prompt, c.template) for i in rows]
        if not harmful:
            raise ConfigError("attack.samples: refusal_ablation needs at least one harmful prompt")
        layer = self.resolve_layer(len(decoder_layers(model)))
        model.eval()
        args = (layer, c.position, c.batch_size, c.max_prompt_tokens)
        direction = (mean_activation(model, tokenizer, harmful, *args)
                     - mean_activation(model, tokenizer, harmless, *args))
        norm = float(direction.norm())
        if not norm > 0:
            raise ConfigError("refusal_ablation: the harmful and harmless mean activations are equal; no direction")
        changed = orthogonalize(model, direction)
        seconds = round(time.perf_counter() - t0, 3)
        ctx.stats["train"] = {"steps": 0, "seconds": seconds, "layer": layer, "position": c.position,
                              "direction_norm": round(norm, 6), "harmful_prompts": len(harmful),
                              "harmless_prompts": len(harmless), "harmless_dataset": c.harmless.name,
                              "matrices": changed}
        ctx.log.info("refusal_ablation: layer %d, position %d, ||r|| = %.4f from %d harmful / %d harmless prompts; "
                     "%d matrices orthogonalised in %.1fs", layer, c.position, norm, len(harmful), len(harmless),
                     changed, seconds)
        return model
