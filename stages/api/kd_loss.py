"""`kdcache.kd_loss`: the loss of `kdcache train` for causal-lm on a batch of `cache.collate`.

``alpha * T^2 * KD + (1 - alpha) * CE``: KD the codec's term averaged over the batch's stored
tokens, CE the next-token cross-entropy averaged over the positions whose next label is not -100.
Both come from one chunked pass (stages/tasks/lm_loss.py), so the extra memory is O(chunk x V), never
a float32 (tokens x V) copy; `kd_loss_fused` takes the last hidden states and the output layer
instead of the logits, and (tokens x V) logits never exist (Liger-Kernel's fused linear loss).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kdcache.stages.api.cache import positions
from kdcache.stages.common.device import to_device
from kdcache.stages.tasks import lm_loss
from kdcache.storage.errors import UsageError

ALPHA = 0.9  # `kdcache train`'s default


class KDTerms(NamedTuple):
    loss: torch.Tensor  # carries the gradient
    kd: torch.Tensor  # T^2 * KD mean, detached
    ce: torch.Tensor  # next-token CE mean, detached


def _parts(batch: dict, width: int, device: torch.device, temperature: float | None):
    info = batch.get("kd")
    if info is None:
        raise UsageError(
            "kd_loss: the batch has no 'kd' entry: build batches with cache.collate "
            "(DataLoader(cache.dataset(data), collate_fn=cache.collate))"
        )
    if width != info.num_classes:
        raise UsageError(
            f"kd_loss: the student outputs {width} logits per token but the cache's vocabulary "
            f"is {info.num_classes}: build the student with vocab_size={info.num_classes}"
        )
    pos = batch.get("positions")
    if pos is None:  # a hand-made batch: selecting from the mask's host copy is one sync here
        stored = batch.get("target_mask", batch["attention_mask"])
        pos = positions(stored.cpu(), batch["labels"].cpu())
    T = float(info.temperature if temperature is None else temperature)
    stored = {f.name: to_device(batch[f.name], device) for f in info.codec.token_fields()}
    targets = info.codec.token_targets(stored, info.temperature, T, info.num_classes)
    return pos.to(device), targets, T


def _check_alpha(alpha: float) -> float:
    if not 0 <= alpha <= 1:
        raise UsageError(f"kd_loss: alpha {alpha} is outside [0, 1]: pass 0 <= alpha <= 1")
    return float(alpha)


def kd_loss(logits: torch.Tensor, batch: dict, alpha: float = ALPHA,
            temperature: float | None = None, chunk_mb: float | None = None,
            return_terms: bool = False):  # fmt: skip
    """The loss of logits (B, L, V) on `batch` (or `KDTerms` with `return_terms`).

    `temperature` defaults to the store's (what `kdcache train` uses); `chunk_mb` is the float32
    logits per chunk, `--loss-chunk-mb` (default 64 MB, 4 on the CPU)."""
    alpha = _check_alpha(alpha)
    pos, targets, T = _parts(batch, logits.shape[-1], logits.device, temperature)
    mb = chunk_mb or lm_loss.default_chunk_mb(logits.device)
    chunk = lm_loss.chunk_tokens(mb, logits.shape[-1], "kd_loss chunk_mb")
    loss, ce, kd = lm_loss.causal_lm_loss(logits, pos, targets, T, 1 - alpha, alpha, chunk)
    return KDTerms(loss, kd, ce) if return_terms else loss


def kd_loss_fused(hidden: torch.Tensor, head: torch.nn.Linear, batch: dict, alpha: float = ALPHA,
                  temperature: float | None = None, chunk_mb: float | None = None,
                  return_terms: bool = False):  # fmt: skip
    """`kd_loss` of the last hidden states (B, L, H) through the output layer `head` (an
    `nn.Linear`, e.g. `model.get_output_embeddings()`), chunk by chunk."""
    alpha = _check_alpha(alpha)
    width = head.weight.shape[0]
    if hidden.shape[-1] != head.weight.shape[1]:
        raise UsageError(
            f"kd_loss_fused: hidden states of width {hidden.shape[-1]} do not fit the output "
            f"layer's {head.weight.shape[1]} inputs: pass the last hidden states (after the "
            "final norm) and the layer that maps them to logits"
        )
    pos, targets, T = _parts(batch, width, hidden.device, temperature)
    mb = chunk_mb or lm_loss.default_chunk_mb(hidden.device)
    chunk = lm_loss.chunk_tokens(mb, width, "kd_loss chunk_mb")
    loss, ce, kd = lm_loss.causal_lm_loss(hidden, pos, targets, T, 1 - alpha, alpha, chunk, head)
    return KDTerms(loss, kd, ce) if return_terms else loss
