"""A sequence codec's soft targets in the form the chunked causal-lm loss consumes.

Every target here is row-aligned with the batch's valid tokens (row t = the t-th stored token),
so a chunk of tokens is a plain row slice: no ragged offsets, nothing read back to the host.
Each gives, for a chunk's student log-probabilities ``log_q = log_softmax(z / T)`` (and
``q = exp(log_q)``), the summed KD term without the ``T^2`` factor and its gradient with
respect to ``z / T``, written out so the loss never keeps autograd's (tokens x V) graph:

    sampled  L_t = -sum_j w_j log q[id_j]              dL/dz_t = (sum_j w_j) q - sum_j w_j e_id_j
    topk     L_t = KL(p || q) over k + 1 buckets       (see `Buckets.loss_grad`)
    dense    L_t = KL(p || q) over all V               dL/dz_t = (sum_{p>0} p) q - p

The formulas are those of each codec's `soft_loss` (tests/stages/test_lm_loss.py checks values
and gradients against it).
"""

from __future__ import annotations

import torch

from kdcache.storage.codecs.losses import retemper


class Sparse:
    """Weighted ids per token, padded to a fixed width (weight 0 at the pads): the sampled
    codec's unique draws with weights ``count / N``."""

    def __init__(self, ids: torch.Tensor, weights: torch.Tensor):
        self.ids, self.weights = ids, weights

    @classmethod
    def from_ragged(cls, per: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, width: int):
        """`per[t]` entries of token t, packed in `ids`/`w`, as (T, width) rows. `width` is a
        static bound (the codec's draws per token), so nothing waits on the device."""
        per = per.long()
        n = len(per)
        tok = torch.repeat_interleave(torch.arange(n, device=per.device), per, output_size=len(ids))
        start = torch.cumsum(per, 0) - per
        pos = torch.arange(len(ids), device=per.device) - start[tok]
        out_ids = torch.zeros(n, width, dtype=torch.int64, device=per.device)
        out_w = torch.zeros(n, width, dtype=w.dtype, device=per.device)
        out_ids[tok, pos] = ids.long()
        out_w[tok, pos] = w
        return cls(out_ids, out_w)

    def rows(self, a: int, b: int) -> Sparse:
        return Sparse(self.ids[a:b], self.weights[a:b])

    def loss_grad(self, log_q: torch.Tensor, q: torch.Tensor, grad: bool):
        w = self.weights.to(log_q.dtype)
        loss = -(w * log_q.gather(1, self.ids)).sum()
        if not grad:
            return loss, None
        g = q * w.sum(1, keepdim=True)
        return loss, g.scatter_add_(1, self.ids, -w)


class Buckets:
    """The topk codec's k stored classes per token plus one residual bucket: the teacher's
    bucket log-probabilities `log_p` (T, k + 1), or (T, k) when k = V (no residual)."""

    def __init__(self, idx: torch.Tensor, log_p: torch.Tensor):
        self.idx, self.log_p = idx, log_p

    def rows(self, a: int, b: int) -> Buckets:
        return Buckets(self.idx[a:b], self.log_p[a:b])

    def loss_grad(self, log_q: torch.Tensor, q: torch.Tensor, grad: bool):
        """KL over the buckets, the student's residual in log space (as `soft_loss_topk`).

        With ``pp = p`` where ``p > 0`` (else 0) and ``rest = softmax`` of the student over the
        unstored classes, ``dL/dz = (sum pp) q - pp_k at the k classes - pp_r * rest``."""
        log_p = self.log_p.to(log_q.dtype)
        log_qb = log_q.gather(1, self.idx)
        rest = None
        if log_p.shape[1] > self.idx.shape[1]:
            rest = log_q.scatter(1, self.idx, float("-inf"))
            log_q_rest = rest.logsumexp(1, keepdim=True)
            log_qb = torch.cat([log_qb, log_q_rest], 1)
        p = log_p.exp()
        pp = torch.where(p > 0, p, torch.zeros_like(p))
        loss = torch.where(p > 0, p * (log_p - log_qb), torch.zeros_like(p)).sum()
        if not grad:
            return loss, None
        k = self.idx.shape[1]
        # The residual bucket's share spreads over the unstored classes as the student does.
        g = torch.zeros_like(q) if rest is None else rest.sub_(log_q_rest).exp_().mul_(-pp[:, k:])
        g.scatter_(1, self.idx, -pp[:, :k])
        return loss, g.addcmul_(q, pp.sum(1, keepdim=True))


class Dense:
    """Every class's stored tempered logit `s` per token (the dense codec, or an online teacher's
    logits stored at T = 1): the teacher is ``softmax(s * stored_T / T)``, made per chunk."""

    def __init__(self, stored: torch.Tensor, stored_T: float, T: float):
        self.stored, self.stored_T, self.T = stored, stored_T, T

    def rows(self, a: int, b: int) -> Dense:
        return Dense(self.stored[a:b], self.stored_T, self.T)

    def loss_grad(self, log_q: torch.Tensor, q: torch.Tensor, grad: bool):
        log_p = torch.log_softmax(retemper(self.stored, self.stored_T, self.T).to(log_q.dtype), 1)
        p = log_p.exp()
        # A class the teacher rules out (logit -inf, p = 0) adds 0, not 0 * -inf: its log p is
        # clamped to the least finite value. Then the KL is one dot product over the chunk,
        # and every step is in place (this runs every online-KD step, over tokens x V).
        diff = log_p.clamp_min_(torch.finfo(log_p.dtype).min).sub_(log_q)
        loss = torch.dot(p.reshape(-1), diff.reshape(-1))
        if not grad:
            return loss, None
        total = p.sum(1, keepdim=True)
        return loss, p.neg_().addcmul_(q, total)
