"""Knowledge distillation with the teacher online: the exact full-KD reference for cached students.

With ``--teacher`` and no ``--cache`` the frozen teacher runs on every training batch (eval mode,
no gradient) and the soft term is the dense ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``
over all classes, per sample, or per valid token for causal-lm: the math of a dense cache
(`soft_loss_dense`), fed the live logits as values stored at T = 1. There are no teacher features
(a feature loss needs a store). The teacher's forward time is measured, so a run can say what a
cache would have saved.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from kdcache.stages.common.device import autocast
from kdcache.stages.tasks.causal_lm import target_mask, valid_tokens
from kdcache.storage.codecs.dense import soft_loss_dense


class OnlineTeacher:
    """A built teacher (`model`, and its `identity` from the pipeline) run on the student's
    batches. Not a submodule of the student: DDP never wraps it, each rank holds its own copy,
    and neither the optimizer nor a checkpoint sees its weights."""

    def __init__(self, model: nn.Module, identity: dict, task):
        self.model, self.identity, self.task = model, identity, task
        self.device, self.precision = torch.device("cpu"), "fp32"
        self.seconds = 0.0

    def place(self, device: torch.device, precision: str) -> None:
        """Move to the student's device; the teacher runs under the student's autocast
        precision, so an online step costs what a real full-KD step would."""
        self.model.to(device).eval()
        self.device, self.precision = device, precision

    def logits(self, x) -> torch.Tensor:
        """The teacher's float32 logits on inputs `x`, its forward time added to `seconds`."""
        tick = time.perf_counter()
        with torch.no_grad(), autocast(self.device, self.precision):
            z = self.task.logits(self.model, x).float()
        if self.device.type == "cuda":  # kernels run asynchronously: wait before reading the clock
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - tick
        return z

    def soft_loss(self, z_student: torch.Tensor, x, T: float) -> torch.Tensor:
        """The dense soft loss of student logits `z_student` (rows, or the valid tokens in order)
        against the teacher on the same inputs `x`."""
        z = self.logits(x)
        if self.task.per_token:
            z = valid_tokens(z, target_mask(x))
        return soft_loss_dense(z_student, z, 1.0, T)

    def take_seconds(self) -> float:
        """The forward seconds since the last call (one epoch's worth, in the trainer)."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds
