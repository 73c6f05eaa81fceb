"""The losses of stage two that no codec owns: hard-label cross-entropy and the feature loss.

The trainer combines them as ``alpha * soft + (1 - alpha) * hard + beta * feature``, where the
soft term comes from the store's codec (`kdcache.storage.codecs`, formulas in
`kdcache/storage/codecs/losses.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcache.storage.codecs.losses import check_same_shape, upcast


def hard_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the labeled rows only (``label >= 0``; -1 marks a missing label).

    ``L = -1/|M| * sum_{b in M} log softmax(z_s[b])[y_b]`` with ``M = {b : y_b >= 0}``.
    A batch with no labels returns 0, still attached to the graph so a combined loss can always
    call ``backward()``. Written without selecting the labeled rows (a data-dependent size) or
    asking whether there are any: neither waits on the device.
    """
    logits = upcast(student_logits)
    mask = labels >= 0
    per_row = F.cross_entropy(logits, labels.clamp_min(0).long(), reduction="none")
    return (per_row * mask).sum() / mask.sum().clamp_min(1)


def feature_loss(projected_student: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """``mean((f_s - f_t)^2)`` over all elements; ``f_t`` is cast to ``f_s``'s dtype.

    ``projected_student`` must already be mapped to the teacher's feature width.
    """
    check_same_shape(projected_student, teacher_features, "feature_loss")
    student = upcast(projected_student)
    return F.mse_loss(student, teacher_features.to(student.dtype))
