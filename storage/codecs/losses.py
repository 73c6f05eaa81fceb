"""The tensor math of the soft losses, shared by the codecs that own them.

Stage one stores teacher logits already divided by its temperature, ``s = z / T_store``. All losses
reduce by the mean over the batch and work in log space. Storage may hand over float16:
teacher-side inputs are upcast to float32 (or to the student's dtype if that is wider) before any
arithmetic. The soft losses carry the usual ``T^2`` factor (Hinton et al., 2015) so their gradient
scale does not shrink as ``T`` grows and ``alpha`` keeps the same meaning across temperatures.
"""

from __future__ import annotations

import torch

Temperature = float | torch.Tensor


def upcast(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """Upcast half-precision tensors to float32, or to ``like``'s dtype when that is wider."""
    dtype = torch.float32
    if like is not None and like.is_floating_point() and like.element_size() > 4:
        dtype = like.dtype
    if t.is_floating_point() and t.element_size() < torch.finfo(dtype).bits // 8:
        return t.to(dtype)
    return t


def check_temperature(name: str, value: Temperature) -> None:
    if isinstance(value, int | float) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    # mse_loss would broadcast e.g. (B, 1) against (B,) into (B, B) with only a warning.
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row ``sum_i p_i (log p_i - log q_i)`` with ``0 * log 0 := 0``.

    Without the guard a teacher bucket with ``log p = -inf`` (an empty top-k residual, a masked
    class) would give ``0 * -inf = nan``.
    """
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def retemper(stored: torch.Tensor, stored_T: Temperature, T: Temperature) -> torch.Tensor:
    """Logits at temperature ``T`` from values stored at ``stored_T``: ``s * stored_T / T``.

    Since ``s = z / stored_T``, this is ``z / T`` exactly (up to rounding).
    """
    check_temperature("stored_T", stored_T)
    check_temperature("T", T)
    return upcast(stored) * (stored_T / T)
