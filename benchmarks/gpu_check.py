"""GPU check: the paper preset's defence and attack on a Llama-2-7B-shaped model, a few steps each,
with the plan the pre-flight picks. At most about 5 minutes on one GPU.

    python benchmarks/gpu_check.py                    # 7B shape, random weights, the first visible GPU
    python benchmarks/gpu_check.py --tiny --device cpu --precision mixed   # tiny Llama on CPU (the script, not memory)

What it does: resolves ``harness run --preset paper --defence repnoise --attack harmfulqa`` (the
paper's values: RepNoise batch 8 x 128 tokens, lr 2e-5; attack batch 4 x 256 tokens, lr 3e-5),
asks the pre-flight (``harness.lib.memory.plan_trial``) for a plan on the visible GPU (one
process: FSDP is not considered; a refusal is reported and the script exits 2), builds a model of
Llama-2-7b's shape (32 layers, hidden 4096, MLP 11008, vocabulary 32000) with random weights
directly on the device in the plan's weight dtype (float32 master weights under the default mixed
precision), and runs the real ``RepNoise.apply`` and ``HarmfulQA.run`` (the harness's training
loop, under the activated plan) for ``--steps`` optimizer steps each on synthetic
question/answer/refusal text tokenised by a small local tokenizer (no download). It reports, per
stage, the measured peak of allocated GPU memory next to the pre-flight's estimate, seconds per
step (the first step, which includes allocator warm-up, apart) and whether every loss is finite,
as JSON on stdout and in ``--out``.

On CPU (``--tiny``) the peak is the process's maximum resident memory, which is not comparable with
the estimate; the run only shows that the script and the planned training path work.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import resource
import sys
import time
from pathlib import Path

import torch

from harness.api.components import Example
from harness.api.config import resolve
from harness.api.registry import ATTACKS, DEFENCES
from harness.lib.context import StageContext, seed_everything
from harness.lib.memory import activate, model_shape, plan_trial, profile_gpus, shape_from_config, visible_gpus
from harness.lib.models import pick_dtype
from harness.lib.tiny import train_tokenizer

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=512, max_position_embeddings=512)
WORDS = ("how can i make a dangerous thing at home without anyone noticing first step second step mix the "
         "parts carefully sorry but cannot help with that request it could hurt people please ask something "
         "else safe").split()


def synthetic_rows(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [Example(prompt=text(12) + "?", response=text(rng.randint(60, 140)), refusal=text(rng.randint(20, 60)))
            for _ in range(n)]


def peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def run_stage(name, component, model, tok, rows, ctx):
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t0 = time.perf_counter()
    if name == "defence":
        model = component.apply(model, tok, rows, ctx)
    else:
        model = component.run(model, tok, rows, ctx)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    wall = time.perf_counter() - t0
    train = ctx.stats["train"]
    losses = train["losses"]
    per_step = train["seconds"] / max(1, train["steps"])
    return model, {"optimizer_steps": train["steps"], "micro_steps": train["micro_steps"],
                   "losses": losses, "finite_loss": all(math.isfinite(x) for x in losses),
                   "seconds": round(wall, 2), "seconds_per_step": round(per_step, 3),
                   "peak_gb": round(peak_gb(ctx.device), 3), "precision": train.get("precision"),
                   "plan": train.get("memory")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama instead of the 7B shape")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per stage (default 3)")
    ap.add_argument("--gpu-profile", help="plan for a named GPU profile instead of the visible GPU (dry planning)")
    ap.add_argument("--precision", choices=["auto", "mixed", "pure"], default="auto",
                    help="model.precision (auto: mixed on a GPU; on CPU pass mixed to run the GPU default's code path)")
    ap.add_argument("--out", help="also write the JSON report here")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    shape_cfg = TINY if args.tiny else LLAMA2_7B
    model_id = "meta-llama/Llama-2-7b-chat-hf"
    spec = resolve("paper", defence="repnoise", attack="harmfulqa", model=model_id,
                   sets=[f"model.device={device.type}", f"model.precision={args.precision}",
                         f"defence.samples={8 * args.steps}",
                         f"attack.samples={4 * args.steps}"])
    shape = shape_from_config({**shape_cfg, "tie_word_embeddings": False}) if args.tiny else model_shape(model_id)
    gpus = profile_gpus(args.gpu_profile, 1) if args.gpu_profile else (visible_gpus()[:1] if device.type == "cuda" else [])
    plan = plan_trial(spec, gpus, device=device.type, shape=shape,
                      fsdp_reason=lambda stage: "gpu_check runs in one process", bf16_supported=(
                          device.type != "cuda" or torch.cuda.is_bf16_supported()))
    report = {"what": "benchmarks/gpu_check.py: paper preset repnoise defence + harmfulqa attack, random weights",
              "shape": "tiny" if args.tiny else "Llama-2-7B", "model_config": shape_cfg,
              "device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "python": platform.python_version(), "steps": args.steps,
              "plan": plan.as_dict()}
    if device.type == "cpu":
        report["note"] = ("CPU run (no GPU where this was produced): it checks that the script and the planned "
                          "training path (mixed precision under autocast, the paper's defence and attack) work; its "
                          "peak is the process's resident memory and says nothing about GPU memory or speed")
    if not plan.fits:
        report["refused"] = plan.message
        print(json.dumps(report, indent=2))
        return 2

    from transformers import LlamaConfig, LlamaForCausalLM

    seed_everything(spec.seed)
    weights = pick_dtype(spec.model, device)
    tok = train_tokenizer()
    config = LlamaConfig(**shape_cfg, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(config).to(weights)
    report["build_s"] = round(time.perf_counter() - t0, 2)
    report["parameters"] = sum(p.numel() for p in model.parameters())

    stages = {}
    with activate(plan):
        for name, registry, cfg in (("defence", DEFENCES, spec.defence.config), ("attack", ATTACKS, spec.attack.config)):
            component = registry.get(getattr(spec, name).name)(cfg)
            ctx = StageContext(name, seed=spec.seed, device=device, dtype=weights, spec=spec, progress=False)
            rows = synthetic_rows(cfg.samples, spec.seed + len(stages))
            model, stages[name] = run_stage(name, component, model, tok, rows, ctx)
            stages[name]["estimate_gb"] = plan.stages[name].memory_gb["total"]
            stages[name]["capacity_gb"] = plan.stages[name].capacity_gb
    report["stages"] = stages
    report["ok"] = all(s["finite_loss"] and s["optimizer_steps"] == args.steps for s in stages.values())
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
