"""Where a student's loss is computed: the one place that combines its terms, and the only caller
of a codec's soft loss.

Per batch::

    loss = alpha * soft + (1 - alpha) * hard + beta * feature + gamma * relation

- **hard**: the task's (`Task.hard_loss`): cross-entropy on the labels (`--pseudo-labels`: on the
  cached teacher's top-1), or MSE to a regression store's true targets; without a teacher
  (no `--cache`, no `--teacher`) the loss is this term alone.
- **soft**: the store's codec (`Codec.soft_loss`: dense KL, top-k buckets, sampled draws; the
  formulas live with each codec in `kdcache/storage/codecs/`), or the dense KL against the
  teacher run online on the same batch (stages/train/online.py). A task whose soft target is the
  teacher's stored values (regression) takes its own distance to them (`Task.value_loss`).
- **feature**: MSE between the projected student features and the stored teacher features.
- **relation**: `--relation` between the batch's student and stored features
  (stages/train/relations.py).

A per-token task (causal-lm) takes hard and soft in one chunked pass over its valid tokens
(stages/tasks/lm_loss.py), fused with the student's output layer where it can be.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcache.stages.common.device import to_device
from kdcache.stages.tasks import lm_loss
from kdcache.stages.tasks.causal_lm import next_token_loss, target_mask, valid_tokens
from kdcache.stages.tasks.classification import hard_loss
from kdcache.stages.train import relations
from kdcache.storage.codecs import token_targets
from kdcache.storage.codecs.losses import check_same_shape, upcast

__all__ = ["StudentLoss", "feature_loss", "hard_loss"]


def feature_loss(projected_student: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """``mean((f_s - f_t)^2)`` over all elements; ``f_t`` is cast to ``f_s``'s dtype.

    ``projected_student`` must already be mapped to the teacher's feature width.
    """
    check_same_shape(projected_student, teacher_features, "feature_loss")
    student = upcast(projected_student)
    return F.mse_loss(student, teacher_features.to(student.dtype))


class StudentLoss:
    """One run's loss, built once from its resolved settings: `cfg`, its `task`, the cache's
    `reader` (or None), the `online` teacher (or None), the feature `tap`, and for a per-token
    task the fused `head` (or None), the tokens per `chunk` and `plain` (a codec without
    per-token targets: its soft_loss on the valid tokens' full logits)."""

    def __init__(self, cfg, task, reader, online, tap=None, head=None, chunk=0, plain=False):
        self.cfg, self.task, self.reader, self.online, self.tap = cfg, task, reader, online, tap
        self.head, self.chunk, self.plain = head, chunk, plain
        self.weight = task.loss_weight(reader, cfg) if reader is not None else None
        self.teacher = reader is not None or online is not None

    def __call__(self, out, proj, batch) -> dict[str, torch.Tensor]:
        """The terms of one batch: `out` is the student's output (float32 logits, or for a
        per-token task its logits or last hidden states in the autocast dtype), `proj` its
        projected features (or None); the batch's inputs and features already on the device."""
        if self.task.per_token:
            loss, hard, soft = self._tokens(out, batch)
        else:
            hard = self.task.hard_loss(out, batch, self._weight(out))
            soft = self._soft(out, batch) if self.teacher else hard.new_zeros(())
            a = self.cfg.alpha
            loss = a * soft + (1 - a) * hard if self.teacher else hard
        feat = loss.new_zeros(())
        if proj is not None:
            feat = feature_loss(proj, to_device(batch["features"], out.device))
            loss = loss + self.cfg.beta * feat
        rel = loss.new_zeros(())
        if self.cfg.relation:  # the student's features are the tap's, unprojected
            stored = to_device(batch["features"], out.device)
            rel = relations.relation_loss(self.cfg.relation, self.tap.value, stored)
            loss = loss + self.cfg.gamma * rel
        return {"loss": loss, "hard_loss": hard, "soft_loss": soft, "feature_loss": feat,
                "relation_loss": rel}  # fmt: skip

    def _weight(self, z):
        w = self.weight
        if w is not None and w.device != z.device:
            self.weight = w = w.to(z.device)  # once: it is the same every batch
        return w

    def _stored(self, batch, device) -> dict:
        return {f.name: to_device(batch[f.name], device) for f in self.reader.codec.fields()}

    def _soft(self, z, batch) -> torch.Tensor:
        r, T = self.reader, self.cfg.temperature
        if r is None:
            return self.online.soft_loss(z, to_device(batch["input"], z.device), T)
        if self.task.soft_on_values:
            values = to_device(r.codec.teacher_values(batch), z.device)
            return self.task.value_loss(z, values, self._weight(z))
        return r.codec.soft_loss(z, self._stored(batch, z.device), r.temperature, T)

    def _tokens(self, out, batch):
        """(loss, hard, soft) of a per-token batch in one chunked pass over its valid tokens:
        `out` is the student's logits, or its last hidden states when its head is fused."""
        cfg, r, dev = self.cfg, self.reader, out.device
        pos = batch.get("positions")
        if pos is None:  # (the training loop selects them from the host's batch)
            x = batch["input"]
            pos = lm_loss.positions(
                x["input_ids"].cpu(), x["attention_mask"].cpu(), target_mask(x).cpu()
            ).to(dev)
        T = cfg.temperature or 1.0
        if self.plain:  # the loss before the chunked one, for codecs that only have soft_loss
            x = to_device(batch["input"], dev)
            mask = target_mask(x)
            hard = next_token_loss(out.float(), x["input_ids"], x["attention_mask"], mask)
            z = valid_tokens(out.float(), mask)
            soft = r.codec.soft_loss(z, self._stored(batch, dev), r.temperature, T)
            return cfg.alpha * soft + (1 - cfg.alpha) * hard, hard, soft
        targets = None
        if r:
            stored = self._stored(batch, dev)
            targets = r.codec.token_targets(stored, r.temperature, T, r.num_classes)
        elif self.online:
            z_t = self.online.logits(to_device(batch["input"], dev))
            z_t = z_t.reshape(-1, z_t.shape[-1]).index_select(0, pos.index)
            targets = token_targets.Dense(z_t, 1.0, T)  # the live logits, "stored" at T = 1
        w_soft = cfg.alpha if targets is not None else 0.0
        head = self.head.linear if self.head is not None else None
        return lm_loss.causal_lm_loss(out, pos, targets, T, 1 - w_soft, w_soft, self.chunk, head)
