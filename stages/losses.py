"""Distillation losses on plain tensors.

Stage one stores teacher logits already divided by its temperature, ``s = z / T_store``, either
densely (all ``C`` classes) or as top-k (``k`` indices, their ``s`` values sorted descending, and
the full-row ``lse = logsumexp(s)``). All losses reduce by the mean over the batch and work in
log space. Storage may hand over float16: teacher-side inputs are upcast to float32 (or to the
student's dtype if that is wider) before any arithmetic.

The trainer combines them as ``alpha * soft + (1 - alpha) * hard + beta * feature``. The soft
losses carry the usual ``T^2`` factor (Hinton et al., 2015) so their gradient scale does not
shrink as ``T`` grows and ``alpha`` keeps the same meaning across temperatures.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Temperature = float | torch.Tensor


def _up(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """Upcast half-precision tensors to float32, or to ``like``'s dtype when that is wider."""
    dtype = torch.float32
    if like is not None and like.is_floating_point() and like.element_size() > 4:
        dtype = like.dtype
    if t.is_floating_point() and t.element_size() < torch.finfo(dtype).bits // 8:
        return t.to(dtype)
    return t


def _check_temperature(name: str, value: Temperature) -> None:
    if isinstance(value, int | float) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    # mse_loss would broadcast e.g. (B, 1) against (B,) into (B, B) with only a warning.
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row ``sum_i p_i (log p_i - log q_i)`` with ``0 * log 0 := 0``.

    Without the guard a teacher bucket with ``log p = -inf`` (an empty top-k residual, a masked
    class) would give ``0 * -inf = nan``.
    """
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def hard_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the labeled rows only (``label >= 0``; -1 marks a missing label).

    ``L = -1/|M| * sum_{b in M} log softmax(z_s[b])[y_b]`` with ``M = {b : y_b >= 0}``.
    A batch with no labels returns ``0 * sum(z_s)``: zero, but still attached to the graph so a
    combined loss can always call ``backward()``.
    """
    logits = _up(student_logits)
    mask = labels >= 0
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask], labels[mask].long())


def retemper(stored: torch.Tensor, stored_T: Temperature, T: Temperature) -> torch.Tensor:
    """Logits at temperature ``T`` from values stored at ``stored_T``: ``s * stored_T / T``.

    Since ``s = z / stored_T``, this is ``z / T`` exactly (up to rounding).
    """
    _check_temperature("stored_T", stored_T)
    _check_temperature("T", T)
    return _up(stored) * (stored_T / T)


def soft_loss_dense(
    student_logits: torch.Tensor,
    stored_logits: torch.Tensor,
    stored_T: Temperature,
    T: Temperature,
) -> torch.Tensor:
    """``T^2 * mean_b KL(p_b || q_b)`` over all ``C`` classes.

    ``p = softmax(s * stored_T / T)`` (the teacher at ``T``), ``q = softmax(z_s / T)`` and
    ``KL(p || q) = sum_i p_i (log p_i - log q_i)``, with both log-probabilities from
    ``log_softmax``.
    """
    _check_same_shape(student_logits, stored_logits, "soft_loss_dense")
    _check_temperature("T", T)
    log_q = F.log_softmax(_up(student_logits) / T, dim=-1)
    log_p = F.log_softmax(retemper(stored_logits, stored_T, T).to(log_q.dtype), dim=-1)
    return _kl_rows(log_p, log_q).mean() * T**2


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
    _check_temperature("stored_T", stored_T)
    _check_temperature("T", T)
    _check_same_shape(topk_indices, topk_logits, "soft_loss_topk indices/logits")
    num_classes, k = student_logits.shape[-1], topk_indices.shape[-1]
    if k > num_classes:
        raise ValueError(f"top-k has {k} classes but the student only {num_classes}")
    idx = topk_indices.long()

    log_q_all = F.log_softmax(_up(student_logits) / T, dim=-1)
    dtype = log_q_all.dtype
    s = _up(topk_logits, log_q_all).to(dtype)
    lse = _up(logsumexp, log_q_all).to(dtype).reshape(s.shape[:-1] + (1,))
    a = stored_T / T

    log_q = log_q_all.gather(-1, idx)
    teacher_t = a * s
    if k < num_classes:
        # Remaining student mass in log space: mask the top-k classes out and logsumexp the rest.
        log_q_rest = log_q_all.scatter(-1, idx, float("-inf")).logsumexp(dim=-1, keepdim=True)
        log_q = torch.cat([log_q, log_q_rest], dim=-1)
        r = (-torch.expm1(s.logsumexp(dim=-1, keepdim=True) - lse)).clamp_min(0.0)
        n_rest = num_classes - k
        # log(r) is -inf when r == 0: the bucket then gets zero mass at every temperature.
        s_r = lse + torch.log(r) - math.log(n_rest)
        teacher_t = torch.cat([teacher_t, a * s_r + math.log(n_rest)], dim=-1)
    log_p = teacher_t - teacher_t.logsumexp(dim=-1, keepdim=True)
    return _kl_rows(log_p, log_q).mean() * T**2


def feature_loss(projected_student: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """``mean((f_s - f_t)^2)`` over all elements; ``f_t`` is cast to ``f_s``'s dtype.

    ``projected_student`` must already be mapped to the teacher's feature width.
    """
    _check_same_shape(projected_student, teacher_features, "feature_loss")
    student = _up(projected_student)
    return F.mse_loss(student, teacher_features.to(student.dtype))


def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((pred - target)^2)`` over all elements; shapes must match exactly."""
    _check_same_shape(pred, target, "regression_loss")
    pred = _up(pred)
    return F.mse_loss(pred, target.to(pred.dtype))
