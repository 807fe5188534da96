"""Training one stage (a defence or an attack) on several GPUs with FSDP, under Ray Train.

A trial too big for one GPU (full fine-tuning of a 7B model: weights, gradients and two Adam
moments are 8 bytes per parameter in bf16, plus activations) asks for ``workers: N`` in the
sweep's ``resources`` (or the cost model picks N). The stage then runs as a Ray Train job of N
workers (``TorchTrainer``; NCCL on GPUs, gloo on CPU), each of which

1. runs the trial's own stages of its task (``harness.pipeline.stages``: setup, data, defence and,
   for an attack, attack), so it draws the same data and starts from the same model as
   ``run_trial`` (the data stage on rank 0 first, so only it generates missing texts), with an
   ``FSDPTrainer`` in place of the one-process ``Trainer``, which
2. shards the model with PyTorch FSDP2 (``fully_shard`` on every decoder layer, the embeddings, the final
   norm and the LM head, then on the model; see ``wrap``),
3. trains on its slice of every global batch: the global batch of ``batch_size`` rows is split into
   ``world`` consecutive slices of ``batch_size // world`` rows, so the optimiser sees the same
   batches as on one GPU (if ``batch_size`` is not a multiple of ``world`` the global batch becomes
   ``world x (batch_size // world)``, at least ``world``; the record says so); FSDP averages
   the gradients,
4. gathers the full state dict on rank 0, which saves it like a one-GPU run does (safetensors + the
   ``.complete`` marker written last): the defended checkpoint ``STORAGE/<defence key>`` or the
   attacked model ``STORAGE/attacked/<trial id>`` that the ``cell`` stage then scores.

The defence and attack code is the same as on one GPU (``Defence.apply``, ``Attack.run`` with
``harness.lib.training.train_loop``: Adam, clipping, schedule work on FSDP2's DTensor parameters).
Supported: components that only call the model's forward (SFT-style attacks, refusal training,
gradient ascent, ...) and save with the default ``save_defended``; defences that wrap the model
for the attack (``prepare_attack``) or save adapters are refused with a clear error.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from harness.api.components import Defence
from harness.api.config import attack_config, validate
from harness.api.record import TrainStats
from harness.api.registry import DEFENCES
from harness.lib.checkpoints import is_complete, save_model
from harness.lib.layers import decoder_layers, final_norm, lm_head
from harness.pipeline.stages import run_stage, stages_for_task
from harness.pipeline.state import Trainer, TrialPaths, open_trial
from harness.sweep.grid import import_plugins

log = logging.getLogger("harness.sweep.fsdp")


class FSDPError(RuntimeError):
    pass


def shard_rows(rows: Sequence[Any], world: int, rank: int, batch_size: int) -> tuple[list[Any], int]:
    """This rank's rows: its slice of every global batch. Returns (rows, per-rank batch size);
    every rank gets the same number of rows (a short last batch is split evenly, the remainder
    dropped)."""
    b = max(1, batch_size // world)
    g = b * world
    out: list[Any] = []
    full = len(rows) - len(rows) % g
    for start in range(0, full, g):
        out.extend(rows[start + rank * b: start + (rank + 1) * b])
    tail = rows[full:]
    per = len(tail) // world
    if per:
        out.extend(tail[rank * per:(rank + 1) * per])
    return out, b


def unsupported_reason(kind: str, spec) -> Optional[str]:
    """Why ``kind`` ("defence" or "attack") of ``spec`` cannot train with FSDP, or None."""
    d = DEFENCES.get(spec.defence.name)
    if kind == "defence" and d.save_defended is not Defence.save_defended:
        return (f"defence {spec.defence.name!r} saves its own checkpoint format (save_defended); FSDP training "
                "supports defences saved as a full model only")
    if kind == "attack" and (d.prepare_attack is not Defence.prepare_attack or d.prepare_eval is not Defence.prepare_eval
                             or d.load_defended is not Defence.load_defended):
        return (f"defence {spec.defence.name!r} wraps the model for the attack (prepare_attack/prepare_eval/"
                "load_defended); FSDP attacks support plain defended models only")
    if kind == "attack" and getattr(attack_config(spec), "lora", None):
        return "attack.lora with FSDP is not supported (a LoRA attack fits one GPU)"
    return None


def check_supported(comp, kind: str) -> None:
    reason = unsupported_reason(kind, comp.spec)
    if reason:
        raise FSDPError(f"{reason}: give this stage workers: 1")


def wrap(model) -> Any:
    """FSDP2: shard every decoder layer, the input embeddings, the final norm and the LM head as
    units of their own, then the model. Own units matter for defences that call parts of the model
    outside its forward (RepNoise runs the decoder body and applies ``lm_head(final_norm(h))`` per
    layer): each unit gathers its weights when called. Tied input/output embeddings stay in the
    root unit (they cannot be split), so such a defence needs untied embeddings under FSDP."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if not tied:
        emb, head = model.get_input_embeddings(), [final_norm(model), lm_head(model)]
        for part in [emb, *head]:
            if part is not None and any(True for _ in part.parameters()):
                fully_shard(part)
        units = [h for h in head if h is not None and hasattr(h, "unshard")]

        def gather_head(module, args):  # the head's weights may be read directly (fused logit lens)
            for unit in units:
                unit.unshard()

        emb.register_forward_pre_hook(gather_head)
    fully_shard(model)
    # One forward through the whole model makes it FSDP's root, with every unit in its state; else a
    # defence that calls only the decoder body makes the embeddings a root of their own, and after
    # backward the head's gradients (read directly, outside any forward) are never reduced.
    device = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    return model


def full_state_dict(model) -> dict:
    """The whole (unsharded) state dict on rank 0 (CPU), empty elsewhere; a collective call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_full(config, state_dict: dict, tokenizer, folder: Path, meta: dict, dtype) -> None:
    """Rank 0: rebuild the model on the meta device, load the gathered weights, save + marker."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise FSDPError(f"gathered state dict does not match the model: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    save_model(fresh, tokenizer, folder, meta=meta)


class FSDPTrainer(Trainer):
    """The trial's training stages on one FSDP rank: each rank trains on its slice of every global
    batch (``shard_rows``) of the FSDP-wrapped model (``wrap``); the defended weights are gathered
    to rank 0, which saves them (a collective call: every rank calls ``save_defended``)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.info: dict[str, Any] = {}

    def prepare(self, component, rows, model):
        cfg = component.config
        rows, b = shard_rows(rows, self.world, self.rank, getattr(cfg, "batch_size", 1))
        if hasattr(cfg, "batch_size"):
            component.config = cfg.model_copy(update={"batch_size": b})
        self.info = {"workers": self.world, "per_rank_batch": b, "global_batch": b * self.world,
                     "configured_batch": getattr(cfg, "batch_size", None), "rows_per_rank": len(rows),
                     "backend": dist.get_backend()}
        return rows, wrap(model)

    def stats(self, train):
        return {**(train or {}), "fsdp": self.info}

    def save_defended(self, trial, model, tokenizer, folder, meta):
        save_gathered(model, tokenizer, folder, meta, trial.dtype, self.rank)


def save_gathered(model, tokenizer, folder: Path, meta: dict, dtype, rank: int) -> None:
    """Gather the full state dict (every rank calls this) and save it on rank 0."""
    sd = full_state_dict(model)
    if rank == 0:
        save_full(model.config, sd, tokenizer, Path(folder), meta, dtype)


def fsdp_worker(config: dict[str, Any], rank: int, world: int, device) -> dict[str, Any]:
    """The body of one FSDP worker (the process group is already initialised): the trial's stages
    of the ``defence`` or ``attack`` task (``harness.pipeline.stages.stages_for_task``) with an
    ``FSDPTrainer``; the data stage runs on rank 0 first, so only it generates missing texts."""
    kind = config["kind"]
    import_plugins(config.get("plugins") or [])
    spec = validate(config["spec"])
    trainer = FSDPTrainer(rank, world)
    t = open_trial(spec, TrialPaths.of(config["output"], config["storage"]), progress=False, device=device,
                   trainer=trainer)
    check_supported(t.comp, kind)
    t0 = time.perf_counter()
    for stage in stages_for_task(kind):
        if stage.name == "data":  # rank 0 first: it generates (and caches) missing texts; the others read them
            for turn in (0, 1):
                if (rank == 0) == (turn == 0):
                    run_stage(t, stage)
                dist.barrier()
        else:
            run_stage(t, stage)
    train = (t.record.train.get(kind) or TrainStats()).model_dump(mode="json")
    if kind == "attack":  # the defence's checkpoint is saved by the defence stage; the attacked model here
        model, tokenizer = t.attacked
        save_gathered(model, tokenizer, Path(config["folder"]), {"train": train, "seed": spec.seed,
                                                                 "trial_id": spec.trial_id}, t.dtype, rank)
    out = {"train": train, "fsdp": trainer.info, "seconds": round(time.perf_counter() - t0, 2), "rank": rank}
    if rank == 0:
        out["saved"] = config["folder"]
    dist.barrier()
    return out


def _ray_train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    os.environ.update(config.get("env") or {})
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    metrics = fsdp_worker(config, ctx.get_world_rank(), ctx.get_world_size(), device)
    if ctx.get_world_rank() == 0:
        ray.train.report({k: v for k, v in metrics.items()})
    else:
        ray.train.report({"rank": ctx.get_world_rank()})
    dist.barrier()


def train_fsdp(kind: str, spec, output, storage, folder, *, workers: int, use_gpu: bool,
               plugins: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the ``kind`` ("defence" or "attack") stage of ``spec`` as a Ray Train job of ``workers``
    FSDP workers; rank 0 saves the result to ``folder``. Returns rank 0's metrics."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    folder = Path(folder)
    if is_complete(folder):
        return {"reused": True, "folder": str(folder)}
    env = {k: os.environ[k] for k in ("HARNESS_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                      "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM") if k in os.environ}
    config = {"kind": kind, "spec": spec.model_dump(mode="json"), "output": str(output), "storage": str(storage),
              "folder": str(folder), "plugins": list(plugins or []), "env": env}
    per_worker = {"CPU": 1.0, **({"GPU": 1.0} if use_gpu else {})}
    name = f"fsdp-{kind}-{(spec.defence_key() if kind == 'defence' else spec.trial_id)}-{int(time.time())}"
    trainer = TorchTrainer(
        _ray_train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(Path(storage).resolve() / "_ray_train")))
    result = trainer.fit()
    if getattr(result, "error", None):
        raise result.error
    if not is_complete(folder):
        raise FSDPError(f"FSDP {kind} finished without a complete checkpoint at {folder}")
    return dict(result.metrics or {})
