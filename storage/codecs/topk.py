"""The `topk` codec: the k largest tempered logits per sample, their classes and the normaliser.

Columns: ``topk_indices`` ``fixed_size_list<int32>[k]`` (classes, largest first), ``topk_logits``
``fixed_size_list<VALUE>[k]`` (their ``s = z / T``, descending) and ``logsumexp`` ``float32`` (over
all C classes), all computed in float32 from the full ``s``. The loss is the exact KL over k + 1
buckets (the k classes and one residual), re-temperable. Statistics: ``kl_sum`` and
``residual_sum`` (what the k + 1 buckets lose against the full teacher, and the unstored mass).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from kdcache.storage.codecs import register, token_targets
from kdcache.storage.codecs.base import (
    DTYPES,
    FRESH,
    Codec,
    fixed_list,
    id_type,
    largest_fitting,
    torch_dtype,
)
from kdcache.storage.codecs.losses import (
    Temperature,
    check_same_shape,
    check_temperature,
    kl_rows,
    upcast,
)
from kdcache.storage.errors import UsageError
from kdcache.storage.options import Option


def topk_kl_cost(s: torch.Tensor, idx: torch.Tensor, lse: torch.Tensor) -> tuple:
    """Per-sample KL(teacher || top-k + residual bucket spread evenly) and residual mass.

    The reconstruction keeps the k exact probabilities and shares the residual mass r equally over
    the other C-k classes; the KL is what that loses: sum_rest p log p - r log(r / (C-k)).
    """
    c, k = s.shape[1], idx.shape[1]
    logp = s - lse[:, None]
    p = logp.exp()
    in_topk = torch.zeros_like(p, dtype=torch.bool).scatter_(1, idx, True)
    rest = torch.where(in_topk, torch.zeros_like(p), p)
    r = rest.sum(1)
    if k >= c:
        return torch.zeros_like(r), torch.zeros_like(r)
    ent = torch.where(in_topk, torch.zeros_like(p), p * logp).sum(1)
    safe = r.clamp_min(1e-30)
    kl = (ent - r * (safe.log() - math.log(c - k))).clamp_min(0)
    return kl, r


def topk_stats(s: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, work=FRESH) -> tuple:
    """(logsumexp, KL, residual) per item from the k values and one (items, C) temporary.

    The logsumexp is ``torch.logsumexp``'s own formula with the top-1 as the max (bit for bit
    the same); its ``exp(s - max)`` is then reused: zeroed at the top k, it gives the unstored
    classes' ``sum p log p`` as a dot product with ``s - lse``. The residual is
    ``r = -expm1(logsumexp(vals) - lse)``, as the loss computes it; the KL is `topk_kl_cost`'s.
    """
    c, k = s.shape[1], idx.shape[1]
    m = vals[:, :1]
    e = torch.sub(s, m, out=work.get("topk.e", s.shape, s.dtype, s.device)).exp_()
    total = e.sum(1)
    lse = total.log().add_(m[:, 0])
    r = (-torch.expm1(vals.logsumexp(1) - lse)).clamp_min(0)
    if k >= c:
        return lse, torch.zeros_like(r), torch.zeros_like(r)
    e.scatter_(1, idx, 0.0)
    rest = e.sum(1)
    dot = e.mul_(s).sum(1)  # in place: still the one temporary
    ent = (dot - lse * rest) / total
    safe = r.clamp_min(1e-30)
    return lse, (ent - r * (safe.log() - math.log(c - k))).clamp_min(0), r


def soft_loss_topk(
    student_logits: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_logits: torch.Tensor,
    logsumexp: torch.Tensor,
    stored_T: Temperature,
    T: Temperature,
) -> torch.Tensor:
    """``T^2 * mean_b KL(p_b || q_b)`` over ``k + 1`` buckets: the teacher's top-k classes and
    one residual bucket holding all other classes.

    Teacher at the stored temperature: ``p_i = exp(s_i - lse)`` for the k stored classes and
    ``r = max(0, 1 - sum_i p_i)`` for the rest (computed as ``-expm1(logsumexp(s_topk) - lse)``;
    the clamp absorbs float16 rounding). The teacher is not renormalised over the top-k.

    Student at ``T``: ``log q_i = log_softmax(z_s / T)_i`` for the same k classes and
    ``log q_r = logsumexp_{j not in topk} log_softmax(z_s / T)_j``, i.e. the remaining mass taken
    in log space rather than as ``log(1 - sum q_i)``, which cancels catastrophically.

    At ``T == stored_T`` this is the exact (k+1)-bucket KL. For ``T != stored_T`` the true
    logits of the ``C - k`` unstored classes are unknown, so they are assumed equal, sharing the
    logit ``s_r = lse + log(r / (C - k))`` (which reproduces mass ``r`` at ``stored_T``). All
    logits are re-tempered by ``a = stored_T / T`` and normalised jointly::

        L     = logsumexp([a * s_1, ..., a * s_k, a * s_r + log(C - k)])
        log p_i = a * s_i - L,    log p_r = a * s_r + log(C - k) - L

    With ``k == C`` there is no residual bucket and the result equals :func:`soft_loss_dense`.
    Zero-probability teacher buckets contribute exactly 0 (``0 * log 0 := 0``).
    ``logsumexp`` may be shaped ``(B,)`` or ``(B, 1)``.
    """
    check_temperature("stored_T", stored_T)
    check_temperature("T", T)
    check_same_shape(topk_indices, topk_logits, "soft_loss_topk indices/logits")
    num_classes, k = student_logits.shape[-1], topk_indices.shape[-1]
    if k > num_classes:
        raise ValueError(f"top-k has {k} classes but the student only {num_classes}")
    idx = topk_indices.long()

    log_q_all = F.log_softmax(upcast(student_logits) / T, dim=-1)
    dtype = log_q_all.dtype
    s = upcast(topk_logits, log_q_all).to(dtype)
    lse = upcast(logsumexp, log_q_all).to(dtype).reshape(s.shape[:-1] + (1,))
    a = stored_T / T

    log_q = log_q_all.gather(-1, idx)
    if k < num_classes:
        # Remaining student mass in log space: mask the top-k classes out and logsumexp the rest.
        log_q_rest = log_q_all.scatter(-1, idx, float("-inf")).logsumexp(dim=-1, keepdim=True)
        log_q = torch.cat([log_q, log_q_rest], dim=-1)
    log_p = teacher_buckets(s, lse, a, num_classes)
    return kl_rows(log_p, log_q).mean() * T**2


def teacher_buckets(s: torch.Tensor, lse: torch.Tensor, a: float, num_classes: int):
    """The teacher's log-probabilities over the k stored classes and, when k < C, the residual
    bucket (`soft_loss_topk`'s formulas), from stored `s` (.., k), `lse` (.., 1) and a = T_s / T."""
    k = s.shape[-1]
    teacher_t = a * s
    if k < num_classes:
        r = (-torch.expm1(s.logsumexp(dim=-1, keepdim=True) - lse)).clamp_min(0.0)
        n_rest = num_classes - k
        # log(r) is -inf when r == 0: the bucket then gets zero mass at every temperature.
        s_r = lse + torch.log(r) - math.log(n_rest)
        teacher_t = torch.cat([teacher_t, a * s_r + math.log(n_rest)], dim=-1)
    return teacher_t - teacher_t.logsumexp(dim=-1, keepdim=True)


@register
class TopK(Codec):
    name = "topk"
    options = (
        Option("top_k", int, 8, "Classes (tokens) kept per sample (per token) by topk.", minimum=1),
    )
    tasks = ("classification", "causal-lm")
    stats_keys = ("mean_topk_kl", "mean_residual_mass")

    @property
    def k(self) -> int:
        return int(self.settings["top_k"])

    @property
    def ids(self) -> pa.DataType:
        # Classifier stores keep int32 (kdcache/2's documented schema); token ids take the
        # narrowest unsigned width that holds the vocabulary.
        return id_type(self.num_classes) if self.sequence else pa.int32()

    @classmethod
    def fit_budget(cls, budget: float, s: torch.Tensor, values: dict) -> dict:
        """The largest k whose columns, as a shard stores them (compressed: file bytes, as
        the sampled codec's budget counts them), take at most `budget` bytes per token on the
        probe's tokens `s`: a binary search, each try one `torch.topk` of the probe."""
        soft = {"dtype": values.get("dtype", "float16"), "num_classes": int(s.shape[-1])}

        def cost(k: int) -> float:
            codec = cls(soft | {"top_k": k}, "causal-lm")
            columns, _ = codec.encode(s.float().clone())  # a read-back per try, once per run
            return codec.stored_bytes_per_token(columns, len(s))

        # Start from the payload's k (compression seldom leaves more) and double while it fits,
        # so that no try holds far more than the answer's k values per token (V may be 152k).
        c = int(s.shape[-1])
        per_k = id_type(c).bit_width // 8 + DTYPES[soft["dtype"]].bit_width // 8
        lo, hi = 0, min(c, max(1, int((budget - 4) // per_k)))
        while hi < c and cost(hi) <= budget:
            lo, hi = hi, min(c, 2 * hi)
        lo = largest_fitting(cost, budget, lo, hi)
        if lo == 0:
            raise UsageError(
                f"--budget-bytes-per-token {budget:g} is below topk's minimum of {cost(1):.2f} "
                "bytes per token (one id, one value and the logsumexp, as stored) on this "
                "teacher: raise it"
            )
        return {"top_k": lo}

    def check_classes(self, num_classes: int) -> None:
        if self.k > num_classes:
            raise UsageError(
                f"--top-k {self.k} exceeds the teacher's {num_classes} classes; use <= {num_classes}"
            )

    def token_fields(self) -> list[pa.Field]:
        return [
            pa.field("topk_indices", pa.list_(self.ids, self.k), nullable=False),
            pa.field("topk_logits", pa.list_(DTYPES[self.dtype], self.k), nullable=False),
            pa.field("logsumexp", pa.float32(), nullable=False),
        ]

    on_device = True

    def work_bytes(self, num_classes: int) -> int:
        return 4 * num_classes  # topk_stats' one temporary

    def encode_device(self, s: torch.Tensor, tokens: dict | None = None, work=FRESH) -> tuple:
        vals, idx = torch.topk(s, self.k, dim=1)
        # The logsumexp is also the non-finite check: NaN or +inf anywhere make it NaN.
        lse, kl, r = topk_stats(s, vals, idx, work)
        acc = torch.float32 if s.device.type == "mps" else torch.float64  # mps has no float64
        stats = {"kl_sum": kl.to(acc).sum(), "residual_sum": r.to(acc).sum()}
        columns = {
            "topk_indices": idx.to(torch_dtype(self.ids, idx.device)),
            "topk_logits": vals.to(torch_dtype(DTYPES[self.dtype])),
            "logsumexp": lse,
        }
        return columns, stats, torch.isfinite(lse)

    def token_arrays(self, columns: dict[str, np.ndarray]) -> list[pa.Array]:
        return [
            fixed_list(columns["topk_indices"].astype(self.ids.to_pandas_dtype()), self.ids),
            fixed_list(columns["topk_logits"].astype(self.dtype), DTYPES[self.dtype]),
            pa.array(columns["logsumexp"].astype(np.float32)),
        ]

    def summarise(self, totals: dict) -> dict:
        rows = totals.get("tokens") or totals.get("rows", 0)  # per token for sequences
        if "kl_sum" not in totals or not rows:
            return {}
        return {
            "mean_topk_kl": totals["kl_sum"] / rows,
            "mean_residual_mass": totals["residual_sum"] / rows,
        }

    def label(self) -> str:
        if self.sequence:
            return f"top-{self.k} of {self.num_classes} tokens per position"
        return f"top-{self.k} of {self.num_classes} classes"

    def error_text(self, stats: dict) -> str | None:
        kl = stats.get("mean_topk_kl")
        return None if kl is None else f"mean KL(teacher || top-k + residual) {kl:.2g} nats"

    def soft_loss(self, student_logits, batch, stored_T, T):
        return soft_loss_topk(
            student_logits,
            batch["topk_indices"],
            batch["topk_logits"],
            batch["logsumexp"],
            stored_T,
            T,
        )

    def token_targets(self, batch, stored_T, T, num_classes: int, dtype=torch.float32):
        """The chunked causal-lm loss's targets (`token_targets.Buckets`): the teacher's k + 1
        bucket log-probabilities at T, made once per batch (small: tokens x (k + 1))."""
        check_temperature("stored_T", stored_T)
        check_temperature("T", T)
        s = upcast(batch["topk_logits"]).to(dtype)
        lse = upcast(batch["logsumexp"]).to(dtype).reshape(s.shape[:-1] + (1,))
        log_p = teacher_buckets(s, lse, stored_T / T, num_classes)
        return token_targets.Buckets(batch["topk_indices"].long(), log_p)

    def teacher_top1(self, columns: dict) -> np.ndarray:
        return np.asarray(columns["topk_indices"][:, 0], dtype=np.int64)
