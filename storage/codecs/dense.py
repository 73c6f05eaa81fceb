"""The `dense` codec: every class's tempered logit (small C, and the regression teacher's outputs).

Column ``logits``: ``fixed_size_list<VALUE>[C]`` holding ``s = z / T`` (regression: the raw outputs,
T = 1). Soft loss: ``T^2 * KL(p || q)`` over all C classes, or MSE to the stored outputs for
regression.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from kdcache.storage.codecs import register, token_targets
from kdcache.storage.codecs.base import DTYPES, Codec, fixed_list, torch_dtype
from kdcache.storage.codecs.losses import (
    Temperature,
    check_same_shape,
    check_temperature,
    kl_rows,
    retemper,
    upcast,
)


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
    check_same_shape(student_logits, stored_logits, "soft_loss_dense")
    check_temperature("T", T)
    log_q = F.log_softmax(upcast(student_logits) / T, dim=-1)
    log_p = F.log_softmax(retemper(stored_logits, stored_T, T).to(log_q.dtype), dim=-1)
    return kl_rows(log_p, log_q).mean() * T**2


@register
class Dense(Codec):
    name = "dense"
    tasks = ("classification", "regression", "causal-lm")

    def token_fields(self) -> list[pa.Field]:
        value = DTYPES[self.dtype]
        return [pa.field("logits", pa.list_(value, self.num_classes), nullable=False)]

    on_device = True

    def work_bytes(self, num_classes: int) -> int:
        return 3 * num_classes  # the stored-width copy and the finite mask

    def encode_device(self, s: torch.Tensor, tokens: dict | None = None, work=None) -> tuple:
        # Cast before the copy: float16 halves what crosses to the host.
        logits = s.to(torch_dtype(DTYPES[self.dtype]))  # float32: `s` itself, see to_host
        return {"logits": logits}, {}, torch.isfinite(s).all(-1)

    def token_arrays(self, columns: dict[str, np.ndarray]) -> list[pa.Array]:
        return [fixed_list(columns["logits"].astype(self.dtype), DTYPES[self.dtype])]

    def label(self) -> str:
        if self.sequence:
            return f"all {self.num_classes} logits per token"
        if self.values:
            return f"{self.num_classes} raw outputs"
        return f"all {self.num_classes} logits"

    def soft_loss(self, student_logits, batch, stored_T, T):
        # A regression store's soft target is its values, not a distribution: that task takes
        # its own MSE to `teacher_values` (stages/tasks/regression.py).
        return soft_loss_dense(student_logits, batch["logits"], stored_T, T)

    def token_targets(self, batch, stored_T, T, num_classes: int, dtype=torch.float32):
        """The chunked causal-lm loss's targets (`token_targets.Dense`): the stored logits,
        tempered and normalised chunk by chunk inside the loss."""
        check_temperature("T", T)
        return token_targets.Dense(batch["logits"], stored_T, T)

    def teacher_values(self, columns: dict):
        # Regression stores are written at T = 1: the stored values are the outputs themselves.
        return columns["logits"]

    def teacher_top1(self, columns: dict) -> np.ndarray:
        return np.asarray(columns["logits"], dtype=np.float32).argmax(1).astype(np.int64)
