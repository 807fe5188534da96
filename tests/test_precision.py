"""Mixed precision (float32 master weights and Adam state, bf16 matmuls under autocast) keeps the
small updates that pure bf16 training loses; the precision is resolved from the spec and recorded.
All on CPU (autocast to bf16 works there too), on a tiny random Llama."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.api.components import TrainConfig
from harness.api.config import ModelSpec, resolve
from harness.api.errors import ConfigError
from harness.lib.context import StageContext
from harness.lib.memory import resolve_precision
from harness.lib.models import pick_dtype
from harness.lib.training import make_optimizer, train_loop


class Cfg(TrainConfig):
    pass


def _batches(tok, n=3, rows=4):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (n, rows, 16), generator=g)
    return [{"input_ids": b, "labels": b} for b in ids]


def _loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def _train(model, tok, precision: str, dtype: str, lr: float = 2e-5, steps: int = 3):
    spec = resolve("smoke", defence="none", sets=[f"model.precision={precision}", f"model.dtype={dtype}",
                                                  "model.device=cpu"])
    weights = pick_dtype(spec.model, torch.device("cpu"))
    model = model.to(weights)
    ctx = StageContext("attack", device=torch.device("cpu"), dtype=weights, spec=spec, progress=False)
    cfg = Cfg(lr=lr, samples=12, batch_size=4, warmup_ratio=0.0, scheduler="constant", max_grad_norm=None)
    train_loop(model, _batches(tok)[:steps], cfg, ctx, loss_fn=_loss)
    return model, ctx


def _decoder_weights(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.dim() == 2 and "layers" in n}


def test_mixed_keeps_small_updates_that_pure_bf16_loses(tiny):
    model, tok = tiny
    # the bf16 starting point, so both runs start from identical values
    start = copy.deepcopy(model).to(torch.bfloat16).float()
    before = _decoder_weights(start)

    reference, _ = _train(copy.deepcopy(start), tok, "pure", "float32")
    mixed, ctx = _train(copy.deepcopy(start), tok, "mixed", "bfloat16")
    pure, _ = _train(copy.deepcopy(start), tok, "pure", "bfloat16")
    assert next(mixed.parameters()).dtype == torch.float32  # master weights
    assert next(pure.parameters()).dtype == torch.bfloat16
    assert ctx.stats["train"]["precision"] == {"mode": "mixed", "weights": "float32", "compute": "bfloat16",
                                               "optimizer_state": "float32"}

    def changed(m):
        after = _decoder_weights(m)
        return sum(int((after[n] != before[n]).sum()) for n in before) / sum(v.numel() for v in before.values())

    def delta(m):
        after = _decoder_weights(m)
        return torch.cat([(after[n] - before[n]).flatten() for n in before])

    # Adam's first steps move every weight by about lr: below half a bf16 ulp of most weights
    assert changed(reference) > 0.99
    assert changed(mixed) > 0.99
    assert changed(pure) < 0.6
    ref = delta(reference)
    cos = torch.nn.functional.cosine_similarity
    assert cos(delta(mixed), ref, dim=0) > 0.95  # the same update, computed in bf16
    assert cos(delta(pure), ref, dim=0) < cos(delta(mixed), ref, dim=0) - 0.2


@pytest.mark.parametrize("device, dtype, precision, expect", [
    ("cuda", "auto", "auto", ("mixed", "float32", "bfloat16")),
    ("cuda", "bfloat16", "auto", ("mixed", "float32", "bfloat16")),
    ("cuda", "bfloat16", "pure", ("pure", "bfloat16", "bfloat16")),
    ("cuda", "float32", "auto", ("pure", "float32", "float32")),
    ("cpu", "auto", "auto", ("pure", "float32", "float32")),
    ("cpu", "bfloat16", "auto", ("pure", "bfloat16", "bfloat16")),
    ("cpu", "bfloat16", "mixed", ("mixed", "float32", "bfloat16")),
])
def test_precision_resolution(device, dtype, precision, expect):
    p = resolve_precision(ModelSpec(dtype=dtype, precision=precision), device)
    assert (p.mode, p.weights, p.compute) == expect
    assert p.optimizer_state == p.weights


def test_precision_is_part_of_the_trial_id():
    a = resolve("smoke", defence="none")
    b = resolve("smoke", defence="none", sets=["model.precision=pure"])
    assert a.trial_id != b.trial_id and b.canonical()["model"]["precision"] == "pure"


def test_bad_precision_is_one_line():
    with pytest.raises(ConfigError, match="model.precision"):
        resolve("smoke", sets=["model.precision=fp8"])


def test_8bit_optimizer_needs_bitsandbytes(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("no bitsandbytes")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="bitsandbytes"):
        make_optimizer(p, Cfg(lr=1e-3, samples=1), "8bit")
    with pytest.raises(ConfigError, match="adam or adamw"):
        make_optimizer(p, Cfg(lr=1e-3, samples=1, optimizer="sgd"), "paged_8bit")
