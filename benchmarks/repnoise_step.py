"""One RepNoise training step (forward, backward, Adam step) against its FLOP floor and against
plain fine-tuning, on SmolLM2-135M-Instruct (the harness's embedded default model, loaded by
``harness.lib.models``), batch 4 paired rows x 128 tokens, float32 on CPU.

Reports, in one run:

* the FLOP floor of the RepNoise step relative to a plain fine-tuning step on the same batch
  (``harness.lib.flops``: two body passes, the LM head only at the positions the loss counts —
  final CE, retain CE, a logit lens per hidden state — backward = 2 x forward), beside the
  measured step-time ratio (the goal: measured within 1.15x of the floor);
* peak memory of each step relative to plain fine-tuning: the process's max RSS (each
  implementation runs in its own subprocess) and the peak of live tensor bytes (torch profiler
  memory events over one extra, untimed step, plus parameters and Adam state);
* the loss and the gradients of the defence's step against a straightforward implementation of
  the reference code's computation (full logits per layer, explicit pairwise MMD), float32, same
  noise (``check``: relative differences, goal <= 1e-5);
* the same floor for a Llama-2-7B shape (its ``config.json`` values), for GPU users.

    python benchmarks/repnoise_step.py --out benchmarks/results/repnoise_step.json [--steps 3] [--rounds 3]

Step time is the fastest timed step (each run's first step is warm-up), pooled over ``--rounds``
runs per implementation that alternate between implementations, so a busy machine slows all
alike; the median and CPU seconds are reported beside it. The batch text is synthetic (questions,
answers lengthened to fill the context as long BeaverTails answers do, repeated refusals), so the
run needs nothing but the model.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.lib import flops  # noqa: E402  (pure Python, no torch)

IMPLS = {
    "fast": "defences.repnoise.repnoise_backward (the defence's step: harmless pass's layers recomputed)",
    "fast_no_recompute": "repnoise_backward(recompute_retain=False): the same without the recomputation",
    "plain_sft": "one ordinary fine-tuning step (CE on the harmful batch, every real token)",
    "straightforward": "reference-style: full (batch, seq, vocab) logits per layer, hooks per call",
}
DEFAULT_IMPLS = "fast,fast_no_recompute,plain_sft"
# Llama-2-7B's config.json (meta-llama/Llama-2-7b-hf): the fields the FLOP count reads
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}
TIME_GOAL, MEMORY_GOAL, DIFF_GOAL = 1.15, 1.1, 1e-5


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
# model, batch, counted positions
# ------------------------------------------------------------------------------------------

def load_smollm2():
    import torch

    from harness.api.config import ModelSpec
    from harness.lib.models import load_model

    model, tok, _ = load_model(ModelSpec(device="cpu", dtype="float32"), dtype=torch.float32)
    return model, tok


def _rows(n: int):
    words = "the of and to in that it is was for on are as with his they at be this have from".split()
    return [(f"Question number {i} about {words[i % len(words)]}?",
             " ".join(words[(i + j) % len(words)] for j in range(40)),
             "I'm sorry, but I cannot help with that. " * 3) for i in range(max(n, 8))]


def make_batch(tok, batch: int, length: int):
    """Paired (harmful, harmless) batch of exactly ``length`` tokens per row."""
    import torch

    from defences._common import make_paired_batches
    from harness.api.components import Example

    rows = _rows(4 * batch)
    examples = []
    for i in range(batch):
        prompt, _, refusal = rows[i]
        # lengthen the answer to fill the context, as long BeaverTails answers do
        answer = " ".join(rows[(i + k * batch) % len(rows)][1].strip() for k in range(12))
        examples.append(Example(prompt=prompt, response=answer, refusal=" ".join([refusal.strip()] * 4)))
    (harmful, harmless), = make_paired_batches(tok, examples, batch, length)
    width = harmful["input_ids"].shape[1]
    if width < length:  # pad right to exactly `length`
        pad = tok.pad_token_id
        for b in (harmful, harmless):
            extra = length - width
            b["input_ids"] = torch.cat([b["input_ids"], torch.full((batch, extra), pad)], 1)
            b["attention_mask"] = torch.cat([b["attention_mask"], torch.zeros((batch, extra), dtype=torch.long)], 1)
    return harmful, harmless


def counted_positions(harmful, harmless) -> dict:
    """Positions whose logits the losses use, from the reference masks' definition (docs/design.md):
    label j+1 counts where the texts differ there and its id is not 0; its logits (input position
    j) are used where the texts differ at j (elsewhere the reference zeroes them: no head needed).
    Plain fine-tuning counts every real label token."""
    h, s = harmful["input_ids"], harmless["input_ids"]
    diff = h != s
    live = diff[:, :-1]
    return {"harmful": int((diff[:, 1:] & (h[:, 1:] != 0) & live).sum()),
            "harmless": int((diff[:, 1:] & (s[:, 1:] != 0) & live).sum()),
            "plain": int(harmful["attention_mask"][:, 1:].sum()),
            "tokens": int(h.numel())}


# ------------------------------------------------------------------------------------------
# workers: one implementation per process
# ------------------------------------------------------------------------------------------

def _step_fn(impl, model, harmful, harmless, gen, hooks):
    from defences.repnoise import repnoise_backward

    def step():
        if impl == "straightforward":
            loss = straightforward_loss(model, harmful, harmless, generator=gen)
            loss.backward()
            return float(loss.detach())
        if impl in ("fast", "fast_no_recompute"):
            return repnoise_backward(model, harmful, harmless, generator=gen, hooks=hooks,
                                     recompute_retain=impl == "fast")["loss"]
        if impl == "plain_sft":
            labels = harmful["input_ids"].masked_fill(harmful["attention_mask"] == 0, -100)
            loss = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"], labels=labels).loss
            loss.backward()
            return float(loss.detach())
        raise SystemExit(f"unknown implementation {impl!r}; known: {', '.join(IMPLS)}")

    return step


def live_tensor_peak(fn) -> int:
    """Peak of live tensor bytes allocated while ``fn`` runs, above what was live before (the
    torch profiler's memory events, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def worker(impl: str, steps: int, batch: int, length: int, result: str, memory_profile: bool) -> None:
    import torch

    from defences.repnoise import capture_mlp_outputs

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    load_s = time.perf_counter() - t0
    model.train()
    harmful, harmless = make_batch(tok, batch, length)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    gen = torch.Generator().manual_seed(1234)
    losses, times, cpu = [], [], []
    with capture_mlp_outputs(model) as hooks:
        step = _step_fn(impl, model, harmful, harmless, gen, hooks)

        def train_step():
            value = step()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return value

        for _ in range(steps):
            t, c = time.perf_counter(), time.process_time()
            losses.append(train_step())
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        live = None
        if memory_profile:  # one more step, untimed, after the max RSS was read
            persistent = sum(p.numel() * p.element_size() for p in model.parameters())
            persistent += sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                              if torch.is_tensor(v))
            live = (persistent + live_tensor_peak(train_step)) / 2 ** 20
    out = {"impl": impl, "losses": losses, "step_s": times, "step_cpu_s": cpu, "load_s": load_s,
           "max_rss_mb": max_rss, "live_peak_mib": live, "threads": torch.get_num_threads(),
           "batch": batch, "tokens": int(harmful["input_ids"].shape[1]),
           "counted": counted_positions(harmful, harmless),
           "config": {k: v for k, v in model.config.to_dict().items() if not isinstance(v, dict)}}
    Path(result).write_text(json.dumps(out))


def check_worker(batch: int, length: int, result: str) -> None:
    """Loss and gradients of the defence's step (both recomputation settings) against the
    straightforward implementation, one process, float32, the same weights and noise."""
    import torch

    from defences.repnoise import capture_mlp_outputs, repnoise_backward

    model, tok = load_smollm2()
    model.train()
    harmful, harmless = make_batch(tok, batch, length)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def grads():
        g = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for _, p in params])
        model.zero_grad(set_to_none=True)
        return g

    loss = straightforward_loss(model, harmful, harmless, generator=torch.Generator().manual_seed(1234))
    loss.backward()
    ref_loss, ref = float(loss.detach()), grads()
    del loss
    out = {"reference_loss": ref_loss, "gradient_norm": float(ref.norm())}
    with capture_mlp_outputs(model) as hooks:
        for name, recompute in (("fast", True), ("fast_no_recompute", False)):
            value = repnoise_backward(model, harmful, harmless, generator=torch.Generator().manual_seed(1234),
                                      hooks=hooks, recompute_retain=recompute)["loss"]
            g = grads()
            out[name] = {"loss": value, "loss_rel_diff": abs(value - ref_loss) / abs(ref_loss),
                         "grad_rel_diff": float((g - ref).norm() / ref.norm()),
                         "grad_max_abs_diff_rel_to_max": float((g - ref).abs().max() / ref.abs().max())}
    Path(result).write_text(json.dumps(out))


def _subprocess(args_list: list[str], label: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "result.json"
        print(f"running {label} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, __file__, *args_list, "--result", str(res)], check=True)
        return json.loads(res.read_text())


def run_impl(impl: str, args, memory_profile: bool) -> dict:
    extra = ["--memory-profile"] if memory_profile else []
    return _subprocess(["--worker", impl, "--steps", str(args.steps), "--batch", str(args.batch),
                        "--tokens", str(args.tokens), *extra], impl)


def _merge(runs: list[dict]) -> dict:
    """One record per implementation over its runs: timed steps (each run's steps after its
    first) pooled, the largest max RSS, the live-tensor peak of the run that measured it."""
    out = dict(runs[0])
    out["timed_step_s"] = [t for r in runs for t in (r["step_s"][1:] or r["step_s"])]
    out["timed_step_cpu_s"] = [t for r in runs for t in (r["step_cpu_s"][1:] or r["step_cpu_s"])]
    out["max_rss_mb"] = max(r["max_rss_mb"] for r in runs)
    out["max_rss_mb_per_run"] = [r["max_rss_mb"] for r in runs]
    out["live_peak_mib"] = next((r["live_peak_mib"] for r in runs if r["live_peak_mib"] is not None), None)
    out["step_s_per_run"] = [r["step_s"] for r in runs]
    out["losses_per_run"] = [r["losses"] for r in runs]
    return out


# ------------------------------------------------------------------------------------------
# FLOP floors
# ------------------------------------------------------------------------------------------

def floors(config: dict, batch: int, seq: int, counted: dict) -> dict:
    """The RepNoise floor for ``config`` (and the cost of the harmless pass's recomputation)."""
    shape = flops.shape_of(config)
    out = flops.repnoise_floor(shape, batch, seq, counted["harmful"], counted["harmless"], counted["plain"])
    recompute = flops.body_forward(shape, batch, seq)
    out["with_recompute_ratio"] = (out["repnoise_flops"]["total"] + recompute) / out["plain_flops"]["total"]
    out["head_share_of_repnoise"] = out["repnoise_flops"]["head"] / out["repnoise_flops"]["total"]
    return out


def llama2_7b_floors(batch: int, seq: int, counted: dict) -> dict:
    """The 7B shape at the measured batch's counted positions, and with every position counted
    (the most head work the loss can need at this batch shape)."""
    tokens = batch * seq
    every = {"harmful": tokens - batch, "harmless": tokens - batch, "plain": tokens - batch}
    return {"measured_batch_positions": floors(LLAMA2_7B, batch, seq, counted),
            "every_position_counted": floors(LLAMA2_7B, batch, seq, every)}


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the JSON results here")
    p.add_argument("--steps", type=int, default=3,
                   help="steps per run; step time = the fastest step after each run's first (warm-up)")
    p.add_argument("--rounds", type=int, default=3,
                   help="runs per implementation, alternating between implementations (robust to a busy machine)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--impls", default=DEFAULT_IMPLS, help=f"comma-separated, from: {', '.join(IMPLS)}")
    p.add_argument("--no-check", action="store_true", help="skip the loss/gradient check against the reference")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--check-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory-profile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.batch, args.tokens, args.result, args.memory_profile)
        return 0
    if args.check_worker:
        check_worker(args.batch, args.tokens, args.result)
        return 0
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown or "plain_sft" not in impls:
        p.error(f"--impls: {', '.join(unknown) or 'plain_sft missing'}; choose from {', '.join(IMPLS)} "
                "(plain_sft is the yardstick)")
    check = None if args.no_check else _subprocess(["--check-worker", "--batch", str(args.batch),
                                                    "--tokens", str(args.tokens)], "check")
    rounds = {impl: [] for impl in impls}
    for r in range(args.rounds):
        for impl in impls:
            rounds[impl].append(run_impl(impl, args, memory_profile=r == 0))
    results = {impl: _merge(runs) for impl, runs in rounds.items()}
    plain = results["plain_sft"]
    first = next(iter(results.values()))
    counted, seq = first["counted"], first["tokens"]
    floor = floors(first["config"], args.batch, seq, counted)
    big = llama2_7b_floors(args.batch, seq, counted)

    print(f"\nRepNoise step on SmolLM2-135M, batch {args.batch} x {seq} tokens, float32 CPU ({first['threads']} "
          f"threads); step = fastest timed step of {args.rounds} alternating runs x steps 2..{args.steps}")
    print(f"counted positions: harmful {counted['harmful']}, harmless {counted['harmless']}, plain {counted['plain']} "
          f"of {counted['tokens']} tokens")
    print(f"{'implementation':<19}{'step s':>8}{'median':>8}{'x plain':>8}{'/floor':>8}{'max RSS MB':>11}{'x plain':>8}"
          f"{'live MiB':>9}{'x plain':>8}")
    summary = {}
    for impl, r in results.items():
        row = {"first_loss": r["losses"][0], "step_s": min(r["timed_step_s"]),
               "step_s_median": statistics.median(r["timed_step_s"]), "step_cpu_s": min(r["timed_step_cpu_s"]),
               "max_rss_mb": r["max_rss_mb"], "live_peak_mib": r["live_peak_mib"]}
        row["time_ratio"] = row["step_s"] / min(plain["timed_step_s"])
        row["rss_ratio"] = r["max_rss_mb"] / plain["max_rss_mb"]
        row["live_ratio"] = (r["live_peak_mib"] / plain["live_peak_mib"]
                             if r["live_peak_mib"] and plain["live_peak_mib"] else None)
        repnoise_like = impl != "plain_sft"
        row["time_ratio_over_floor"] = row["time_ratio"] / floor["floor_ratio"] if repnoise_like else None
        summary[impl] = row
        over = f"{row['time_ratio_over_floor']:.2f}" if repnoise_like else "-"
        live = f"{row['live_peak_mib']:.0f}" if row["live_peak_mib"] else "-"
        live_x = f"{row['live_ratio']:.2f}" if row["live_ratio"] else "-"
        print(f"{impl:<19}{row['step_s']:>8.2f}{row['step_s_median']:>8.2f}{row['time_ratio']:>8.2f}{over:>8}"
              f"{row['max_rss_mb']:>11.0f}{row['rss_ratio']:>8.2f}{live:>9}{live_x:>8}")
    print(f"FLOP floor (RepNoise / plain fine-tuning): {floor['floor_ratio']:.2f}x; with the harmless pass recomputed "
          f"{floor['with_recompute_ratio']:.2f}x; LM head = {floor['head_share_of_repnoise']:.0%} of RepNoise's FLOPs")
    if check:
        for name in ("fast", "fast_no_recompute"):
            c = check[name]
            print(f"check {name}: loss rel diff {c['loss_rel_diff']:.1e}, gradient rel diff (L2) {c['grad_rel_diff']:.1e}"
                  f" vs the reference-style step (loss {check['reference_loss']:.6f})")
    m, e = big["measured_batch_positions"], big["every_position_counted"]
    print(f"Llama-2-7B shape, batch {args.batch} x {seq}: floor {m['floor_ratio']:.2f}x at these counted positions "
          f"({e['floor_ratio']:.2f}x with every position counted); with the recomputation {m['with_recompute_ratio']:.2f}x"
          f"; LM head = {m['head_share_of_repnoise']:.0%} of RepNoise's FLOPs")
    goals = None
    if "fast" in summary:
        f = summary["fast"]
        goals = {"time_within_floor": f["time_ratio_over_floor"] <= TIME_GOAL,
                 "memory": f["rss_ratio"] <= MEMORY_GOAL,
                 "same_loss_and_gradients": (check is None or (check["fast"]["loss_rel_diff"] <= DIFF_GOAL
                                                               and check["fast"]["grad_rel_diff"] <= DIFF_GOAL))}
        print(f"goals (time <= {TIME_GOAL}x floor, max RSS <= {MEMORY_GOAL}x plain, loss/gradient rel diff <= "
              f"{DIFF_GOAL:g}): " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in goals.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "command": "python benchmarks/repnoise_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "summary": summary, "floor": floor, "llama2_7b": big, "check": check, "goals": goals,
            "runs": results, "descriptions": {k: IMPLS[k] for k in results}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
