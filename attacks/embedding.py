"""Embedding-space attack: a soft prompt optimised towards affirmative answers, weights frozen.

Paper: Schwinn et al. 2024, "Soft Prompt Threats: Attacking Safety Alignment and Unlearning in
Open-Source LLMs through the Embedding Space" (NeurIPS 2024). An open-weights attacker need not
find discrete tokens: it optimises continuous input embeddings directly, with the model frozen.
Here the attack is their universal variant: one soft prompt ``P`` of ``n_tokens`` vectors,
shared by all prompts, trained on the attack's harmful prompts and evaluated on the held-out
evaluation prompts (an individual, per-evaluation-prompt attack would have to see the evaluation
prompts during the attack). For each training prompt ``x`` with its affirmative target ``y`` (the
first ``target_tokens`` tokens of a harmful answer: the answer's opening, "Sure, here is ..."),

    min_P  - sum_t log p_theta(y_t | [P ; E(x) ; E(y_<t)])         theta frozen

with Adam on ``P`` for ``steps`` steps over mini-batches of ``batch_size`` prompts (cycled in a
seeded order). ``P`` starts from the embeddings of ``init`` repeated (Schwinn et al. start from
the embedding of an ordinary string). ``P`` is placed before the templated prompt (a prefix, not
the paper's suffix: the prefix needs no knowledge of where the prompt sits inside the chat
template, so the evaluation can prepend it to any prompt).

How the evaluation uses it: the attack returns the same model (weights unchanged) with its
``generate`` replaced by ``SoftPromptGenerate``, which prepends ``P`` to the embedded prompt
(``inputs_embeds``, attention 1 on ``P``) and returns the prompt ids followed by the new tokens, as
``model.generate`` does. Everything else (forward, the capability and answer-loss evaluations)
runs on the unchanged weights without ``P``: the attack changes no weight.

Defaults: 8 soft tokens, 100 steps, lr 1e-3, batch 8, 16 target tokens, init "!". Budget in
steps; the search space is lr log-uniform [1e-4, 1e-1], steps {50, 100, 200, 400}, n_tokens
{4, 8, 16, 32}.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pydantic import Field

from harness.api.components import Attack, ComponentConfig, DatasetRef
from harness.api.errors import ConfigError, DivergedError
from harness.api.registry import ATTACKS
from harness.api.space import searchable
from harness.lib.text import PROMPT_TEMPLATE, RESPONSE_SEPARATOR, batches, sft_batch

if TYPE_CHECKING:  # torch is imported by the code that runs: validating the Config needs none
    import torch


class SoftPromptGenerate:
    """A model's ``generate`` with a soft prompt ``P`` (``[n, d]``) in front of every input.

    Called as ``model.generate(input_ids=..., attention_mask=..., **kwargs)``; returns ``[ids ;
    new tokens]`` like the original (``harness.lib.generation`` keeps what follows the prompt)."""

    def __init__(self, model, soft_prompt: torch.Tensor):
        self.original = model.generate
        self.embed = model.get_input_embeddings()
        self.soft_prompt = soft_prompt.detach()

    def __call__(self, input_ids=None, attention_mask=None, **kwargs):
        import torch

        if input_ids is None:
            raise ValueError("a soft-prompted model generates from input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed(input_ids)
        soft = self.soft_prompt.to(embeds.device, embeds.dtype)
        n = input_ids.shape[0]
        embeds = torch.cat([soft[None].expand(n, -1, -1), embeds], dim=1)
        mask = torch.cat([torch.ones(n, soft.shape[0], dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], dim=1)
        new = self.original(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


def attach_soft_prompt(model, soft_prompt: torch.Tensor):
    """``model`` whose ``generate`` prepends ``soft_prompt`` (the instance's method is replaced;
    weights and class are untouched, so every other evaluation sees the plain model)."""
    model.generate = SoftPromptGenerate(model, soft_prompt)
    model.soft_prompt = model.generate.soft_prompt  # plain tensor attribute: not a parameter, not saved
    return model


@ATTACKS.register("embedding")
class EmbeddingAttack(Attack):
    """Universal soft prompt optimised in embedding space towards affirmative answers (Schwinn et al. 2024)."""

    evaluation = "harmfulness"
    cost_factor = 1.0  # forward + backward through the frozen model per step
    #: its result lives in ``generate``, not in the weights: last step of a chain (``attacks.chain``)
    must_be_last = True

    class Config(ComponentConfig):
        n_tokens: int = searchable(8, {"choice": [4, 8, 16, 32]}, gt=0)
        steps: int = searchable(100, {"choice": [50, 100, 200, 400]}, gt=0)
        lr: float = searchable(1e-3, {"log": [1e-4, 1e-1]}, gt=0)
        batch_size: int = Field(8, gt=0)
        target_tokens: int = Field(16, gt=0)
        init: str = "!"
        samples: int = Field(128, gt=0)
        max_length: int = Field(256, gt=0)
        dataset: DatasetRef = DatasetRef(name="beavertails", split="30k_train")
        eval_dataset: DatasetRef = DatasetRef(name="beavertails", split="30k_test")
        template: str = PROMPT_TEMPLATE
        separator: str = RESPONSE_SEPARATOR

    @classmethod
    def trains_adapter_only(cls, config) -> bool:
        return True  # the weights are frozen: only the soft prompt has gradients and optimizer state

    def _targets(self, tokenizer, responses: list[str]) -> list[str]:
        """The first ``target_tokens`` tokens of each answer, as text."""
        out = []
        for r in responses:
            ids = tokenizer(r, add_special_tokens=False)["input_ids"][: self.config.target_tokens]
            out.append(tokenizer.decode(ids))
        return out

    def run(self, model, tokenizer, data, ctx):
        import torch

        from harness.lib.training import autocast

        c = self.config
        rows = [ex for ex in data if ex.response]
        if not rows:
            raise ConfigError("attack.dataset: the embedding attack needs prompts with a target answer")
        embed = model.get_input_embeddings()
        init_ids = tokenizer(c.init, add_special_tokens=False)["input_ids"]
        if not init_ids:
            raise ConfigError(f"attack.init = {c.init!r}: tokenises to nothing")
        init = embed.weight[torch.tensor(init_ids, device=embed.weight.device)].detach().float()
        soft = init.repeat(c.n_tokens // len(init_ids) + 1, 1)[: c.n_tokens].clone().requires_grad_(True)
        targets = self._targets(tokenizer, [ex.response for ex in rows])
        order = torch.randperm(len(rows), generator=ctx.generator(0)).tolist()
        tensors = [sft_batch(tokenizer, [rows[i].prompt for i in chunk], [targets[i] for i in chunk], c.max_length,
                             loss_on="response", template=c.template, separator=c.separator).to(ctx.device)
                   for chunk in batches(order, c.batch_size)]
        trainable = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        opt = torch.optim.Adam([soft], lr=c.lr)
        model.eval()  # frozen weights; dropout off
        losses: list[float] = []
        t0 = time.perf_counter()
        try:
            for step in range(c.steps):
                b = tensors[step % len(tensors)]
                n = b.input_ids.shape[0]
                with autocast(ctx):
                    e = embed(b.input_ids)
                    p = soft.to(e.dtype)[None].expand(n, -1, -1)
                    inputs = torch.cat([p, e], dim=1)
                    mask = torch.cat([torch.ones(n, c.n_tokens, dtype=b.attention_mask.dtype, device=e.device),
                                      b.attention_mask], dim=1)
                    labels = torch.cat([torch.full((n, c.n_tokens), -100, dtype=b.labels.dtype, device=e.device),
                                        b.labels], dim=1)
                    loss = model(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss
                if not torch.isfinite(loss):
                    raise DivergedError(ctx.stage, step + 1, float(loss))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        finally:  # as the model came (a defence's frozen adapter stays frozen)
            for p, flag in zip(model.parameters(), trainable):
                p.requires_grad_(flag)
        seconds = time.perf_counter() - t0
        ctx.stats["train"] = {"steps": c.steps, "micro_steps": c.steps, "seconds": round(seconds, 3),
                              "first_loss": losses[0], "final_loss": losses[-1],
                              "losses": [round(x, 6) for x in losses], "soft_tokens": c.n_tokens,
                              "soft_prompt_norm": round(float(soft.detach().norm(dim=1).mean()), 6),
                              "target_tokens": c.target_tokens}
        ctx.log.info("embedding attack: %d soft tokens, %d steps in %.1fs, target loss %.4f -> %.4f", c.n_tokens,
                     c.steps, seconds, losses[0], losses[-1])
        return attach_soft_prompt(model, soft.detach())
