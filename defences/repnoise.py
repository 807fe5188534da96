"""Representation Noising (RepNoise; Rosati et al., "Representation Noising: A Defence Mechanism
Against Harmful Finetuning", NeurIPS 2024).

For a paired batch (harmful text, harmless twin of the same question; both right-padded with
pad = eos to one length) the loss is::

    L = L_retain + beta * L_noise - alpha * log(L_harmful)

* ``L_noise`` = mean over decoder layers l of MMD(M * mlp_l(x_harmful), M * N(0, I)): the output of
  every layer's MLP module on the harmful pass, masked, flattened per example to
  ``(batch, seq * hidden)``, against standard-normal noise of the same shape and mask; MMD with a
  sum of ``kernel_num`` = 5 Gaussian kernels whose bandwidths are ``base * kernel_mul**i`` with
  ``kernel_mul`` = 2 and ``base`` = (sum of the pairwise squared distances of the 2B rows, not
  differentiated) / ((2B)^2 - 2B) / kernel_mul^(kernel_num // 2); MMD = mean(XX + YY - XY - YX).
* ``L_harmful`` = (CE(final logits) + sum over the ``hidden_states`` entries h of
  CE(lm_head(final_norm(h)))) / len(hidden_states) + 1: a logit lens on every layer; the "+ 1"
  sits outside the division, as in the reference code.
* ``L_retain`` = CE of the harmless pass.

Defaults (the paper's): alpha 1, beta 0.001, lr 2e-5, Adam, cosine schedule, 10% warm-up, batch 8,
1 epoch, 256 tokens, 10k BeaverTails pairs, no frozen layers. (The authors' ``main.py`` halves the
context to 128 tokens for this loss; the ``paper`` preset sets ``max_length: 128``, docs/fidelity.md.)

Two variants of the masks and of the cross-entropy:

``variant="reference"`` (the paper default) reproduces the published code exactly: the mask M is
where the harmful and harmless token ids differ (so it also covers the pad tokens of the shorter
text facing real tokens of the longer one); every CE term uses the harmful/harmless input ids as
labels, ignores label positions whose (shifted) mask is 0 and label id 0 (the reference's notion
of padding), and multiplies the logits at input positions whose mask is 0 by 0 (so the first
differing token is predicted from all-zero logits and contributes exactly log(vocab) with no
gradient); the retain CE uses the same difference mask.

``variant="corrected"`` keeps the formula but fixes the masks: the harmful terms (noise, CE, logit
lens) look at the harmful response tokens (positions at or after the question's token length,
from the prompt template, that are not padding per ``attention_mask``), the retain CE at the
harmless response tokens; token id 0 is an ordinary token and no logits are zeroed. It needs a
``prompt_lengths`` entry in each batch dict (``defences._common.make_paired_batches`` adds it).
The "+ 1" outside the division is kept in both variants: it keeps the argument of the log >= 1,
which bounds the gradient-ascent term (the reference's stabiliser).

Implementation notes (same value as the reference, less time and memory): the MLP-output hooks are
registered once per training run and removed on exit (``capture_mlp_outputs``); the harmful pass
yields the hidden states and the MLP outputs at once; the CE terms are computed only at the label
positions that count, in chunks, by a fused linear + cross-entropy that never holds a
(batch, seq, vocab) tensor; the MMD uses a Gram matrix in float64 and is recomputed in backward
instead of being stored; the training step back-propagates the harmful terms before the harmless
pass runs, so the two graphs never coexist (the gradient is the sum of the same terms), and
recomputes the harmless pass's decoder layers in backward (it runs while the harmful gradients are
held). Matrix work: the FLOP floor of the loss (``harness.lib.flops``: two body passes, the head only
at counted positions) plus that recomputed body forward; ``benchmarks/repnoise_step.py`` measures
the step against plain fine-tuning.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field

from defences._common import DataDefenceConfig, make_paired_batches, model_device, require, train_loop, training_order
from harness.api.components import Defence
from harness.api.registry import DEFENCES

if TYPE_CHECKING:  # torch and the layer helpers are imported where the loss runs: the Config validates without them
    import torch

Variant = Literal["reference", "corrected"]
VARIANTS = ("reference", "corrected")
# The paper's coefficients and mask variant, written once: the defaults of ``RepNoise.Config``
# and of the loss functions below.
PAPER_ALPHA = 1.0
PAPER_BETA = 1e-3
DEFAULT_VARIANT: Variant = "reference"
# elements of one (rows, vocab) logits chunk of the fused cross-entropy (float32: 64 MiB)
CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------
# MMD
# --------------------------------------------------------------------------------------------

def mmd_loss(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """Multi-bandwidth Gaussian-kernel MMD between the rows of ``x`` and ``y`` (both
    ``(batch, features)``, same batch size), as the RepNoise reference defines it.

    Pairwise squared distances come from a float64 Gram matrix (no ``(2B, 2B, features)``
    tensor); the base bandwidth is not differentiated, as in the reference.
    """
    import torch

    if x.dim() != 2 or y.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"mmd_loss needs two (batch, features) tensors of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    work = torch.float32 if x.device.type == "mps" else torch.float64
    n = x.shape[0]
    with _no_autocast(x.device):
        total = torch.cat([x, y], dim=0).to(work)
        m = total.shape[0]
        sq = (total * total).sum(dim=1)
        dist = (sq[:, None] + sq[None, :] - 2.0 * (total @ total.T)).clamp_min(0.0)
        dist = dist.masked_fill(torch.eye(m, dtype=torch.bool, device=dist.device), 0.0)
        base = dist.detach().sum() / (m * m - m)
        base = (base / kernel_mul ** (kernel_num // 2)).clamp_min(torch.finfo(work).tiny)
        kernels = sum(torch.exp(-dist / (base * kernel_mul ** i)) for i in range(kernel_num))
        xx, yy = kernels[:n, :n], kernels[n:, n:]
        xy, yx = kernels[:n, n:], kernels[n:, :n]
        return (xx + yy - xy - yx).mean().to(out_dtype)


def _no_autocast(device: torch.device):
    import torch

    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()  # pragma: no cover


def _masked_layer_mmd(hidden: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    x = (hidden * mask.to(hidden.dtype).unsqueeze(-1)).reshape(hidden.shape[0], -1)
    return mmd_loss(x, noise.reshape(noise.shape[0], -1))


# --------------------------------------------------------------------------------------------
# Fused linear + cross-entropy over selected positions
# --------------------------------------------------------------------------------------------

def _compute_dtype(device: torch.device, weight: torch.Tensor) -> torch.dtype:
    import torch

    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (AttributeError, TypeError, RuntimeError):  # pragma: no cover - old torch
        pass
    return weight.dtype


@functools.lru_cache(maxsize=None)
def _linear_ce_function():
    """The autograd function of the fused path, defined on first use (it subclasses
    ``torch.autograd.Function``; importing this module loads no torch)."""
    import torch

    class _LinearCESum(torch.autograd.Function):
        """sum_i CE(x_i @ W.T + b, label_i), computed chunk by chunk; the gradients w.r.t. x, W and b
        are computed in the forward chunk loop and stored (N x H, V x H), so no logits are kept."""

        @staticmethod
        def forward(ctx, x, weight, bias, labels, rows, cdtype):
            need_x, need_w = x.requires_grad, weight.requires_grad
            need_b = bias is not None and bias.requires_grad
            w = weight.to(cdtype)
            b = bias.to(cdtype) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=x.device)
            gx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
            gb = torch.zeros(bias.shape, dtype=torch.float32, device=x.device) if need_b else None
            rows = min(rows, x.shape[0])
            buf = torch.empty((rows, weight.shape[0]), dtype=torch.float32, device=x.device)  # reused per chunk
            for start in range(0, x.shape[0], rows):
                xc = x[start:start + rows].to(cdtype)
                lab = labels[start:start + rows]
                logp = buf[:xc.shape[0]]
                if cdtype == torch.float32:
                    torch.matmul(xc, w.T, out=logp)
                else:
                    logp.copy_(xc @ w.T)
                if b is not None:
                    logp.add_(b)
                torch.log_softmax(logp, dim=-1, out=logp)  # in place
                total -= logp.gather(1, lab[:, None]).sum()
                if need_x or need_w or need_b:
                    grad = logp.exp_()  # softmax, in place
                    grad[torch.arange(lab.shape[0], device=lab.device), lab] -= 1.0
                    if need_b:
                        gb += grad.sum(0)
                    g = grad if cdtype == torch.float32 else grad.to(cdtype)
                    if need_x:
                        if gx.dtype == cdtype:
                            torch.matmul(g, w, out=gx[start:start + rows])
                        else:
                            gx[start:start + rows] = (g @ w).to(x.dtype)
                    if need_w:
                        if cdtype == torch.float32:
                            gw.addmm_(g.T, xc)
                        else:
                            gw.add_((g.T @ xc).float())
            del buf
            # intermediates, not inputs or outputs: kept on ctx and scaled in place in backward, so
            # no second (vocab, hidden) buffer is allocated there
            ctx.grads = (gx, gw, gb)
            ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
            return total

        @staticmethod
        def backward(ctx, grad_out):
            if ctx.grads is None:
                raise RuntimeError("linear_ce_sum: backward ran twice through one fused cross-entropy "
                                   "(retain_graph is not supported)")
            gx, gw, gb = ctx.grads
            ctx.grads = None
            wdtype, bdtype = ctx.dtypes
            rx = gx.mul_(grad_out.to(gx.dtype)) if gx is not None else None
            rw = gw.mul_(grad_out).to(wdtype) if gw is not None else None
            rb = gb.mul_(grad_out).to(bdtype) if gb is not None else None
            return rx, rw, rb, None, None, None

    return _LinearCESum


def _chunk_rows(vocab: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, vocab))


def linear_ce_sum(x: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, *,
                  transform=None, chunk_elements: Optional[int] = None) -> torch.Tensor:
    """Sum over rows of CE(transform(head(x_i)), label_i) without materialising all the logits.

    A plain ``nn.Linear`` head without ``transform`` takes the fused path; anything else is
    computed chunk by chunk under activation checkpointing (same value, logits recomputed in
    backward instead of stored).
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    if x.shape[0] == 0:  # nothing counts: 0 (the caller's 0 / 0 gives the reference's NaN)
        return (x.sum() * 0.0).float()
    vocab = _vocab_size(head, probe=x)
    rows = _chunk_rows(vocab, chunk_elements or CHUNK_ELEMENTS)
    if isinstance(head, torch.nn.Linear) and transform is None:
        cd = _compute_dtype(x.device, head.weight)
        return _linear_ce_function().apply(x, head.weight, head.bias, labels, rows, cd)

    def piece(xc, lab):
        logits = head(xc)
        if transform is not None:
            logits = transform(logits)
        return F.cross_entropy(logits.float(), lab, reduction="sum")

    total = x.new_zeros((), dtype=torch.float32)
    for start in range(0, x.shape[0], rows):
        total = total + checkpoint(piece, x[start:start + rows], labels[start:start + rows], use_reentrant=False)
    return total


def _vocab_size(head: torch.nn.Module, probe: Optional[torch.Tensor] = None) -> int:
    import torch

    from harness.lib.layers import UnsupportedArchitecture

    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    out = getattr(head, "out_features", None)
    if out:
        return int(out)
    if probe is not None and probe.shape[0] > 0:
        with torch.no_grad():
            return int(head(probe[:1]).shape[-1])
    raise UnsupportedArchitecture(f"cannot tell the vocabulary size of the LM head {type(head).__name__}")


def _final_logit_transform(model):
    """Post-processing some models apply to the final logits (not to a logit lens)."""
    import torch

    from harness.lib.layers import _base

    m = _base(model)
    cap = getattr(getattr(m, "config", None), "final_logit_softcapping", None)
    scale = getattr(m, "logit_scale", None)
    if not cap and (scale is None or scale == 1):
        return None

    def transform(logits):
        if scale is not None and scale != 1:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------

@dataclass
class _CESpec:
    """Which label positions a CE term counts: flat indices (into batch*seq) of the input
    positions whose logits are used, their labels, and the count of counted positions whose
    logits the reference zeroes (each contributes log(vocab))."""

    index: torch.Tensor
    labels: torch.Tensor
    n_zeroed: int
    n_total: int

    def mean(self, sum_live: torch.Tensor, vocab: int, terms: int = 1) -> torch.Tensor:
        return (sum_live + terms * self.n_zeroed * math.log(vocab)) / self.n_total


def _ce_spec(ids: torch.Tensor, keep: torch.Tensor, live: torch.Tensor) -> _CESpec:
    """``keep``/``live`` are (B, S-1) over shifted positions: label ``ids[:, j+1]`` counts when
    keep[j]; its logits (at input position j) are used when live[j], otherwise zeroed."""
    import torch

    b, s = ids.shape
    used = keep & live
    pos = torch.zeros((b, s), dtype=torch.bool, device=ids.device)
    pos[:, :-1] = used
    index = pos.reshape(-1).nonzero().squeeze(1)
    labels = ids[:, 1:][used]
    n_total = int(keep.sum())
    return _CESpec(index=index, labels=labels, n_zeroed=n_total - int(used.sum()), n_total=n_total)


@dataclass
class _Masks:
    noise: torch.Tensor  # (B, S) bool: harmful positions whose MLP outputs enter the MMD
    harmful: _CESpec
    harmless: _CESpec


def _prompt_lengths(batch: dict, which: str) -> torch.Tensor:
    import torch

    lengths = batch.get("prompt_lengths")
    if lengths is None:
        raise ValueError(f"repnoise variant 'corrected' needs 'prompt_lengths' in the {which} batch (tokens of the "
                         "formatted question per row); build batches with defences._common.make_paired_batches")
    return torch.as_tensor(lengths, device=batch["input_ids"].device).reshape(-1, 1)


def _masks(harmful: dict, harmless: dict, variant: str) -> _Masks:
    import torch

    h_ids, s_ids = harmful["input_ids"], harmless["input_ids"]
    if variant == "reference":
        if h_ids.shape != s_ids.shape:
            raise ValueError(f"repnoise: harmful and harmless batches must have one shape (pad them together), got "
                             f"{tuple(h_ids.shape)} and {tuple(s_ids.shape)}")
        diff = h_ids != s_ids
        live = diff[:, :-1]
        return _Masks(noise=diff,
                      harmful=_ce_spec(h_ids, diff[:, 1:] & (h_ids[:, 1:] != 0), live),
                      harmless=_ce_spec(s_ids, diff[:, 1:] & (s_ids[:, 1:] != 0), live))
    if variant == "corrected":
        def response(batch, which):
            ids = batch["input_ids"]
            pos = torch.arange(ids.shape[1], device=ids.device)[None, :]
            real = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(ids, dtype=torch.bool)
            return (pos >= _prompt_lengths(batch, which)) & real

        h_resp, s_resp = response(harmful, "harmful"), response(harmless, "harmless")
        return _Masks(noise=h_resp,
                      harmful=_ce_spec(h_ids, h_resp[:, 1:], torch.ones_like(h_resp[:, 1:])),
                      harmless=_ce_spec(s_ids, s_resp[:, 1:], torch.ones_like(s_resp[:, 1:])))
    raise ValueError(f"repnoise: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")


# --------------------------------------------------------------------------------------------
# Hooks and the two passes
# --------------------------------------------------------------------------------------------

class MLPCapture:
    """Forward hooks on every decoder layer's MLP; they record outputs only while ``active``."""

    def __init__(self, model):
        from harness.lib.layers import mlp_modules

        self.modules = mlp_modules(model)
        self.outputs: list[Optional[torch.Tensor]] = [None] * len(self.modules)
        self.active = False
        self._handles: list = []

    def _hook(self, index):
        def hook(module, args, output):
            if self.active:
                self.outputs[index] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def open(self) -> "MLPCapture":
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        self.outputs = [None] * len(self.modules)

    @contextlib.contextmanager
    def recording(self):
        self.clear()
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def take(self) -> list[torch.Tensor]:
        from harness.lib.layers import UnsupportedArchitecture

        outs = self.outputs
        self.clear()
        if any(o is None for o in outs):
            raise UnsupportedArchitecture("repnoise: not every decoder layer's MLP ran in the forward pass")
        return outs  # type: ignore[return-value]

    def __enter__(self) -> "MLPCapture":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def capture_mlp_outputs(model) -> MLPCapture:
    """Context manager: ``with capture_mlp_outputs(model) as hooks: ...`` registers the MLP hooks
    once and removes them on exit."""
    return MLPCapture(model)


def _body(model):
    from harness.lib.layers import UnsupportedArchitecture, _arch, _base

    m = _base(model)
    body = getattr(m, "base_model", None)
    if body is None or body is m:
        raise UnsupportedArchitecture(f"repnoise: cannot find the transformer body of {_arch(model)}")
    return m, body


def _forward_body(model, batch: dict, hidden_states: bool):
    _, body = _body(model)
    return body(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                output_hidden_states=hidden_states, use_cache=False)


@contextlib.contextmanager
def _recomputed_layers(model, enabled: bool = True):
    """Per-decoder-layer activation checkpointing while the block runs: each layer keeps only its
    input and recomputes its activations in backward. Off when gradients are off or the model
    already checkpoints its layers (Hugging Face ``gradient_checkpointing_enable``)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from harness.lib.layers import decoder_layers

    layers = list(decoder_layers(model)) if enabled and torch.is_grad_enabled() else []
    if any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        layers = []
    saved = [(layer, layer.__dict__.get("forward")) for layer in layers]
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer, own in saved:
            if own is None:
                del layer.forward
            else:
                layer.forward = own


def _retain_term(model, harmless: dict, spec: _CESpec, recompute: bool = False) -> torch.Tensor:
    from harness.lib.layers import lm_head

    head = lm_head(model)
    with _recomputed_layers(model, recompute):
        out = _forward_body(model, harmless, hidden_states=False)
    last = out.last_hidden_state
    x = last.reshape(-1, last.shape[-1]).index_select(0, spec.index)
    s = linear_ce_sum(x, head, spec.labels, transform=_final_logit_transform(model))
    return spec.mean(s, _vocab_size(head))


def _harmful_terms(model, batch: dict, masks: _Masks, hooks: MLPCapture,
                   generator: Optional[torch.Generator], need_noise: bool = True):
    import torch
    from torch.utils.checkpoint import checkpoint

    from harness.lib.layers import UnsupportedArchitecture, _arch, final_norm, lm_head

    head, norm = lm_head(model), final_norm(model)
    spec = masks.harmful
    with hooks.recording():
        out = _forward_body(model, batch, hidden_states=True)
    mlp_outs = hooks.take()
    states = out.hidden_states
    if not states:
        raise UnsupportedArchitecture(f"repnoise: {_arch(model)} returned no hidden_states")
    width = states[0].shape[-1]

    def pick(h):
        return h.reshape(-1, width).index_select(0, spec.index)

    vocab = _vocab_size(head)
    transform = _final_logit_transform(model)
    lens = torch.cat([norm(pick(h)) for h in states], dim=0)
    lens_labels = spec.labels.repeat(len(states))
    final_x = pick(out.last_hidden_state)
    if transform is None:  # one fused pass over every term
        s = linear_ce_sum(torch.cat([final_x, lens], dim=0), head, torch.cat([spec.labels, lens_labels]))
    else:
        s = linear_ce_sum(final_x, head, spec.labels, transform=transform) + linear_ce_sum(lens, head, lens_labels)
    harmful = spec.mean(s, vocab, terms=len(states) + 1) / len(states) + 1

    if need_noise:
        mask = masks.noise
        noise = torch.zeros((), dtype=torch.float32, device=batch["input_ids"].device)
        for h in mlp_outs:
            draw = _randn(h, generator) * mask.to(h.dtype).unsqueeze(-1)
            noise = noise + checkpoint(_masked_layer_mmd, h, mask, draw, use_reentrant=False)
        noise = noise / len(mlp_outs)
    else:
        noise = torch.zeros((), dtype=torch.float32, device=batch["input_ids"].device)
    return harmful, noise


def _randn(like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    import torch

    if generator is None:
        return torch.randn(like.shape, dtype=like.dtype, device=like.device)
    return torch.randn(like.shape, dtype=like.dtype, device=generator.device, generator=generator).to(like.device)


@dataclass
class RepNoiseLoss:
    """The loss and its parts (``total`` is differentiable)."""

    total: torch.Tensor
    retain: torch.Tensor
    harmful: torch.Tensor
    noise: torch.Tensor


def _prepare(model, harmful, harmless, variant):
    import torch

    if variant not in VARIANTS:
        raise ValueError(f"repnoise: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    device = model_device(model)
    harmful = {k: (torch.as_tensor(v).to(device)) for k, v in harmful.items()}
    harmless = {k: (torch.as_tensor(v).to(device)) for k, v in harmless.items()}
    return harmful, harmless, _masks(harmful, harmless, variant)


def repnoise_loss(model, harmful: dict, harmless: dict, *, alpha: float = PAPER_ALPHA, beta: float = PAPER_BETA,
                  variant: Variant = DEFAULT_VARIANT, generator: Optional[torch.Generator] = None,
                  hooks: Optional[MLPCapture] = None) -> RepNoiseLoss:
    """RepNoise loss of one paired batch (see the module docstring).

    ``harmful``/``harmless``: dicts with ``input_ids`` and ``attention_mask`` (as
    ``harness.lib.text.paired_batch`` returns; ``prompt_lengths`` too for the corrected variant).
    ``generator`` draws the noise (the global RNG when None). ``hooks``: an open
    ``capture_mlp_outputs(model)`` to reuse across calls; without it the hooks are registered
    for this call and removed.
    """
    import torch

    harmful, harmless, masks = _prepare(model, harmful, harmless, variant)
    with (contextlib.nullcontext(hooks) if hooks is not None else capture_mlp_outputs(model)) as h:
        harm, noise = _harmful_terms(model, harmful, masks, h, generator)
        retain = _retain_term(model, harmless, masks.harmless)
    total = retain + beta * noise - alpha * torch.log(harm)
    return RepNoiseLoss(total=total, retain=retain, harmful=harm, noise=noise)


def repnoise_backward(model, harmful: dict, harmless: dict, *, alpha: float = PAPER_ALPHA, beta: float = PAPER_BETA,
                      variant: Variant = DEFAULT_VARIANT, generator: Optional[torch.Generator] = None,
                      hooks: Optional[MLPCapture] = None, scale: float = 1.0, amp=None,
                      recompute_retain: bool = True) -> dict[str, float]:
    """Forward and backward of ``scale * repnoise_loss(...).total`` with a lower memory peak:
    the harmful pass (noise and harmful terms) is back-propagated before the harmless pass runs,
    so the two graphs never coexist (the gradients add up to the same total). The harmless pass
    then runs while the harmful pass's gradients (one copy of the parameters) are held, so with
    ``recompute_retain`` its decoder layers are checkpointed (activations recomputed in backward:
    one more body forward of the harmless batch, small next to the logit lens; without it the
    step needs about one activation set more memory than plain fine-tuning). Returns the loss
    and its parts as floats; a non-finite part is not back-propagated (the caller raises)."""
    import torch

    harmful, harmless, masks = _prepare(model, harmful, harmless, variant)
    amp = amp or contextlib.nullcontext
    with (contextlib.nullcontext(hooks) if hooks is not None else capture_mlp_outputs(model)) as h:
        with amp():
            harm, noise = _harmful_terms(model, harmful, masks, h, generator)
            rest = beta * noise - alpha * torch.log(harm)
        if torch.isfinite(rest.detach()):
            (rest * scale).backward()
        with amp():
            retain = _retain_term(model, harmless, masks.harmless, recompute=recompute_retain)
        if torch.isfinite(retain.detach()):
            (retain * scale).backward()
    total = float(retain.detach()) + float(rest.detach())
    return {"loss": total, "retain": float(retain.detach()), "harmful": float(harm.detach()),
            "noise": float(noise.detach())}


def difference_ce(model, harmful: dict, harmless: dict, variant: Variant = DEFAULT_VARIANT):
    """``(harmful CE, harmless CE)`` of the final logits with RepNoise's masks (the adversarial
    loss baseline's two terms)."""
    from harness.lib.layers import lm_head

    harmful, harmless, masks = _prepare(model, harmful, harmless, variant)
    head = lm_head(model)
    spec = masks.harmful
    out = _forward_body(model, harmful, hidden_states=False)
    last = out.last_hidden_state
    x = last.reshape(-1, last.shape[-1]).index_select(0, spec.index)
    harm = spec.mean(linear_ce_sum(x, head, spec.labels, transform=_final_logit_transform(model)), _vocab_size(head))
    return harm, _retain_term(model, harmless, masks.harmless)


# --------------------------------------------------------------------------------------------
# The defence
# --------------------------------------------------------------------------------------------

@DEFENCES.register("repnoise")
class RepNoise(Defence):
    """Representation Noising: harmful activations pushed towards Gaussian noise in every layer."""

    # a harmful and a harmless pass plus a logit lens on every layer. The reference masks count every
    # differing position (pads of the shorter text included) in the lens CE; the corrected variant
    # counts the harmful response tokens only, so fewer head projections.
    cost_factor = 3.0
    corrected_cost_factor = 2.5

    @classmethod
    def training_cost(cls, config) -> float:
        return cls.corrected_cost_factor if config.variant == "corrected" else cls.cost_factor

    class Config(DataDefenceConfig):
        alpha: float = Field(PAPER_ALPHA, ge=0)
        beta: float = Field(PAPER_BETA, ge=0)
        variant: Variant = DEFAULT_VARIANT

    def apply(self, model, tokenizer, data, ctx):
        import torch

        from harness.lib.training import autocast

        cfg = self.config
        data = require(data, ("response", "refusal"), "repnoise")
        device = model_device(model)
        pairs = make_paired_batches(tokenizer, training_order(data, cfg, ctx), cfg.batch_size, cfg.max_length,
                                    device=device, separator=cfg.separator, template=cfg.template)
        noise_gen = torch.Generator(device=device).manual_seed(ctx.seed + 1)

        with capture_mlp_outputs(model) as hooks:
            def step(m, batch, scale):
                harmful, harmless = batch
                return repnoise_backward(m, harmful, harmless, alpha=cfg.alpha, beta=cfg.beta, variant=cfg.variant,
                                         generator=noise_gen, hooks=hooks, scale=scale, amp=lambda: autocast(ctx))

            train_loop(model, pairs, cfg, ctx, step_fn=step, desc="repnoise")
        return model
