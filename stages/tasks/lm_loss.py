"""The causal-lm student's loss in one chunked pass: next-token CE and the KD term together.

``loss = w_hard * CE + w_soft * T^2 * KD`` over a batch's valid tokens, where CE is the mean over
the positions whose next token is real and KD the mean over every valid token of the codec's term
(`kdcache.storage.codecs.token_targets`). Per chunk of tokens both terms read one log-softmax
(two when T != 1: CE is always at T = 1). The real positions are selected once, from the host's
copy of the mask (`positions`), so nothing in the step waits on the device.

Two autograd functions, in the shape of Liger-Kernel's chunked losses, keep the extra memory at
O(chunk x V) instead of O(tokens x V):

- `ChunkedLogits` takes the model's logits (B, L, V). Its forward only sums the loss chunk by
  chunk; its backward recomputes each chunk's softmax and writes that chunk's gradient straight
  into the logits' gradient (the one (B, L, V) tensor autograd needs anyway).
- `FusedHead` takes the last hidden states (B, L, H) and the output layer's weight (and bias) and
  builds each chunk's logits itself, so (tokens x V) logits never exist. As in Liger's
  `LigerFusedLinearDistillationBase`, the gradients are made in the forward, chunk by chunk (the
  chunk's logits are at hand there: recomputing them in backward would cost one more matmul),
  and the backward only scales them by the incoming gradient.

The gradient of each chunk is written out (`_chunk`), not taken by autograd; tests check values
and gradients against the codecs' own `soft_loss` and `lm.next_token_loss` (fp32, 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdcache.stages.common.device import to_device
from kdcache.stages.tasks import causal_lm as lm
from kdcache.storage.codecs.losses import upcast
from kdcache.storage.errors import UsageError

# float32 logits per chunk of the loss, by default: 64 MB (512 tokens at V = 32,768) on an
# accelerator, where large chunks keep kernels busy; 4 MB on the CPU, where a chunk that stays
# in cache makes the loss's passes over it faster (measured at V = 4,096, 1 thread: a step's
# CE + head 42 ms at 64 MB, 35 ms at 4 MB, 36 ms at 1 MB).
CHUNK_MB = 64.0
CPU_CHUNK_MB = 4.0


def default_chunk_mb(device: torch.device | str) -> float:
    """`--loss-chunk-mb` when none is given: by the device the logits are on."""
    return CPU_CHUNK_MB if torch.device(device).type == "cpu" else CHUNK_MB


@dataclass
class Positions:
    """A batch's valid tokens: their flat positions ``b * L + t`` in row order (the stored
    columns' order), the next token at each (-1 for a row's last), and both counts as ints."""

    index: torch.Tensor
    labels: torch.Tensor
    tokens: int
    pairs: int

    def to(self, device: torch.device) -> Positions:
        return Positions(to_device(self.index, device), to_device(self.labels, device),
                         self.tokens, self.pairs)  # fmt: skip


def positions(input_ids: torch.Tensor, mask: torch.Tensor, targets=None) -> Positions:
    """`Positions` of a (B, L) batch (its target positions, `lm.target_mask`; by default every
    valid one). Give it the host's tensors (the loader's batch): the selection's size is
    data-dependent, which on a GPU would be a sync."""
    labels = lm.next_token_labels(input_ids, mask, targets).reshape(-1)
    index = (mask if targets is None else targets).reshape(-1).bool().nonzero().squeeze(1)
    labels = labels[index]
    return Positions(index, labels, len(index), int((labels >= 0).sum()))


def chunk_tokens(mb: float, vocab: int, option: str = "--loss-chunk-mb") -> int:
    """Tokens per chunk so that a chunk's float32 logits take `mb` MB; refuses less than one."""
    n = int(mb * 2**20) // (4 * vocab)
    if n < 1:
        raise UsageError(
            f"{option} {mb:g} holds less than one token's float32 logits at V = {vocab:,} "
            f"({4 * vocab / 2**20:.3g} MB): raise it to at least {4 * vocab / 2**20:.3g}"
        )
    return n


@dataclass
class Spec:
    """What the chunks need besides tensors: targets (or None: CE only), temperature, the two
    weights as applied to the means, and the chunk size."""

    targets: object | None
    T: float
    w_hard: float
    w_soft: float
    chunk: int
    tokens: int = 1
    pairs: int = 1

    @property
    def g_hard(self) -> float:  # d loss / d CE sum
        return self.w_hard / max(1, self.pairs)

    @property
    def g_soft(self) -> float:  # d loss / d KD sum over z / T, times 1 / T for z
        return self.w_soft * self.T / max(1, self.tokens)


def _chunk(z, labels, spec: Spec, targets, grad: bool):
    """(CE sum, KD sum without T^2, d(w_hard * CE_mean + w_soft * T^2 * KD_mean)/dz or None) of
    one chunk's logits `z` (n, V), which this may overwrite."""
    z = upcast(z)
    # One exp pass gives both the log-softmax and the softmax (torch.logsumexp, then exp of
    # the log-softmax, would take two): z is ours (a fresh chunk), so all of it is in place.
    m = z.amax(1, keepdim=True)
    e = z.sub_(m).exp()
    total = e.sum(1, keepdim=True)
    log_total = total.log()
    log_q1 = z.sub_(log_total)  # the log-softmax at T = 1
    lse = m.add_(log_total)
    valid = labels >= 0
    y = labels.clamp_min(0)[:, None]
    ce = -(log_q1.gather(1, y).squeeze(1) * valid).sum()
    q1 = e.div_(total) if grad else None
    kd, g = ce.new_zeros(()), None
    if targets is not None:
        if spec.T == 1:
            log_q, q = log_q1, q1
        else:  # the KD term's own log-softmax, of z / T
            zt = (log_q1 + lse) / spec.T
            log_q = zt.sub_(torch.logsumexp(zt, 1, keepdim=True))
            q = log_q.exp() if grad else None
        kd, g_kd = targets.loss_grad(log_q, q, grad)
        if grad:
            # d/dz = d/d(z/T) / T: the T^2 factor and the mean leave T * w_soft / tokens.
            g = g_kd.mul_(spec.g_soft)
    if not grad:
        return ce, kd, None
    # The CE gradient, softmax - one-hot, in q1's memory (the KD gradient is already made).
    v = (valid.to(q1.dtype) * spec.g_hard)[:, None]
    g_ce = q1.mul_(v).scatter_add_(1, y, -v)
    return ce, kd, g_ce if g is None else g.add_(g_ce)


def _means(ce, kd, spec: Spec, tokens: int, pairs: int):
    hard = ce / max(1, pairs)
    soft = kd * spec.T**2 / max(1, tokens)
    return spec.w_hard * hard + spec.w_soft * soft, hard, soft


def _sum_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class ChunkedLogits(torch.autograd.Function):
    """loss, hard, soft of logits (B, L, V); only loss carries a gradient."""

    @staticmethod
    def forward(ctx, z, index, labels, spec: Spec, tokens: int, pairs: int):
        flat = z.reshape(-1, z.shape[-1])
        ce = kd = flat.new_zeros((), dtype=_sum_dtype(z))
        for a in range(0, len(index), spec.chunk):
            b = min(len(index), a + spec.chunk)
            t = spec.targets.rows(a, b) if spec.targets is not None else None
            c, k, _ = _chunk(flat.index_select(0, index[a:b]), labels[a:b], spec, t, False)
            ce, kd = ce + c, kd + k
        ctx.save_for_backward(z, index, labels)
        ctx.spec = spec
        loss, hard, soft = _means(ce, kd, spec, tokens, pairs)
        ctx.mark_non_differentiable(hard, soft)
        return loss, hard, soft

    @staticmethod
    def backward(ctx, g_loss, _hard, _soft):
        z, index, labels = ctx.saved_tensors
        spec = ctx.spec
        flat = z.reshape(-1, z.shape[-1])
        grad = torch.zeros_like(flat)
        for a in range(0, len(index), spec.chunk):  # recompute each chunk's softmax
            b = min(len(index), a + spec.chunk)
            t = spec.targets.rows(a, b) if spec.targets is not None else None
            _, _, g = _chunk(flat.index_select(0, index[a:b]), labels[a:b], spec, t, True)
            grad.index_copy_(0, index[a:b], g.mul_(g_loss).to(grad.dtype))
        return grad.view_as(z), None, None, None, None, None


class FusedHead(torch.autograd.Function):
    """loss, hard, soft of hidden states (B, L, H) through the output layer (weight (V, H),
    bias (V,) or None); each chunk's logits are made, used and dropped here."""

    @staticmethod
    def forward(ctx, h, weight, bias, index, labels, spec: Spec, tokens, pairs, grad: bool):
        flat = h.reshape(-1, h.shape[-1])
        g_h = torch.zeros_like(flat) if grad else None
        g_w = torch.zeros_like(weight) if grad else None
        g_b = torch.zeros_like(bias) if grad and bias is not None else None
        ce = kd = flat.new_zeros((), dtype=_sum_dtype(weight))
        for a in range(0, len(index), spec.chunk):
            b = min(len(index), a + spec.chunk)
            hc = flat.index_select(0, index[a:b])
            z = torch.nn.functional.linear(hc, weight, bias)
            t = spec.targets.rows(a, b) if spec.targets is not None else None
            c, k, g = _chunk(z, labels[a:b], spec, t, grad)
            ce, kd = ce + c, kd + k
            if grad:
                g = g.to(weight.dtype)
                g_h.index_copy_(0, index[a:b], (g @ weight).to(g_h.dtype))
                g_w.addmm_(g.t(), hc.to(g_w.dtype))
                if g_b is not None:
                    g_b.add_(g.sum(0))
        ctx.grads = (None if g_h is None else g_h.view_as(h), g_w, g_b)
        loss, hard, soft = _means(ce, kd, spec, tokens, pairs)
        ctx.mark_non_differentiable(hard, soft)
        return loss, hard, soft

    @staticmethod
    def backward(ctx, g_loss, _hard, _soft):
        # g_loss is a 0-dim device tensor: scaling by it never reads it back to the host.
        g = [None if t is None else t.mul_(g_loss) for t in ctx.grads]
        ctx.grads = None
        return g[0], g[1], g[2], None, None, None, None, None, None


def causal_lm_loss(out, pos: Positions, targets, T: float, w_hard: float, w_soft: float,
                   chunk: int, head: torch.nn.Linear | None = None):  # fmt: skip
    """(loss, hard, soft): ``w_hard * CE + w_soft * T^2 * KD`` and the two means (detached).

    `out` is the logits (B, L, V), or with `head` the last hidden states (B, L, H) that `head`
    maps to logits chunk by chunk. `targets` None: CE only (and soft 0)."""
    spec = Spec(targets, float(T), float(w_hard), float(w_soft), chunk, pos.tokens, pos.pairs)
    if head is None:
        return ChunkedLogits.apply(out, pos.index, pos.labels, spec, pos.tokens, pos.pairs)
    w, b = head.weight, head.bias
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (out, w, b))
    return FusedHead.apply(out, w, b, pos.index, pos.labels, spec, pos.tokens, pos.pairs, grad)
