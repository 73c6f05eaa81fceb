"""Measuring a classifier's or a language model's predictions: additive metric sums, and the
chunked evaluation forward that makes them.

A batch contributes a float64 vector ``[n, correct, nll_sum, count_b.., confidence_b..,
correct_b..]`` over ``BINS`` equal-width confidence bins; `summarise` turns any sum of such vectors
(over batches, chunks and ranks alike) into accuracy, mean cross-entropy and the expected
calibration error ``ECE = sum_b (n_b / n) * |accuracy_b - confidence_b|`` (Guo et al., 2017; 15
bins). A causal-lm student's rows are its tokens (each labeled with the next one), so its loss is
nats/token. `eval_sums` bounds memory by `--eval-logits-mb` of float32 logits, whatever the number
or the length of the rows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from kdcache.stages import tasks
from kdcache.stages.common.device import autocast, sum_dtype, to_device
from kdcache.stages.tasks import lm_loss
from kdcache.storage.codecs.losses import upcast

BINS = 15
EVAL_LOGITS_MB = 256.0


def sums_size(bins: int = BINS) -> int:
    return 3 + 3 * bins


def bin_index(confidence: torch.Tensor, bins: int = BINS) -> torch.Tensor:
    """Bins (lo, hi] of width 1/bins; confidence 0 falls in the first."""
    return (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)


def batch_sums(logits: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> torch.Tensor:
    """The additive metric vector of one batch (rows with label < 0 are ignored).

    Computed in the logits' own precision (half is upcast to float32) from the log-sum-exp and the
    top logit, without a softmax copy; only the returned sums are float64 (`sum_dtype`)."""
    keep = labels >= 0
    dt = sum_dtype(logits.device)
    z, labels = upcast(logits[keep]), labels[keep].long()
    out = torch.zeros(sums_size(bins), dtype=dt, device=logits.device)
    if not len(labels):
        return out
    lse = z.logsumexp(-1)
    top, pred = z.max(-1)
    confidence = (top - lse).exp()  # the largest softmax probability
    correct = (pred == labels).to(z.dtype)
    b = bin_index(confidence, bins)
    out[0] = len(labels)
    out[1] = correct.sum().to(dt)
    out[2] = (lse - z.gather(1, labels[:, None]).squeeze(1)).sum().to(dt)
    out[3 : 3 + bins] = torch.bincount(b, minlength=bins).to(dt)
    zeros = torch.zeros(bins, dtype=z.dtype, device=z.device)
    out[3 + bins : 3 + 2 * bins] = zeros.index_add(0, b, confidence).to(dt)
    out[3 + 2 * bins :] = zeros.index_add(0, b, correct).to(dt)
    return out


def summarise(sums: torch.Tensor | np.ndarray, bins: int = BINS) -> dict:
    """accuracy, loss (mean cross-entropy) and ece from summed metric vectors; None when empty."""
    s = np.asarray(sums.cpu() if isinstance(sums, torch.Tensor) else sums, dtype=np.float64)
    n = s[0]
    if n == 0:
        return {"n": 0, "accuracy": None, "loss": None, "ece": None}
    conf, corr = s[3 + bins : 3 + 2 * bins], s[3 + 2 * bins :]
    ece = float(np.abs(corr - conf).sum() / n)
    return {"n": int(n), "accuracy": float(s[1] / n), "loss": float(s[2] / n), "ece": ece}


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = BINS
) -> float:
    """Reference ECE on plain arrays, one bin at a time (the definition, for tests and reports)."""
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        m = (confidence > lo) & (confidence <= hi)
        if i == 0:
            m |= confidence == 0
        if m.any():
            total += m.sum() * abs(correct[m].mean() - confidence[m].mean())
    return float(total / len(confidence))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    keep = labels >= 0
    return float((logits[keep].argmax(-1) == labels[keep]).double().mean())


def agreement(student_logits: torch.Tensor, teacher_pred: torch.Tensor) -> float:
    """Fraction of rows where the student's top-1 equals the teacher's."""
    return float((student_logits.argmax(-1) == teacher_pred).double().mean())


def reduce_sums(sums: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Sum a metric vector over ranks (gloo and nccl both take float64; MPS sums are float32)."""
    if enabled:
        dist.all_reduce(sums)
    return sums


@torch.no_grad()
def eval_sums(
    model, batches, device: torch.device, precision: str = "fp32", task=None,
    logits_mb: float = EVAL_LOGITS_MB, head=None,
) -> torch.Tensor:  # fmt: skip
    """Summed metric vector of `model` over (inputs, labels) batches; leaves the model in eval.

    `task` (a `Task` or its name) makes the logits. Labels are (B,) per row, or (B, L) per token for causal-lm (each position a row). Memory is
    bounded by `logits_mb` of float32 logits, whatever the number or length of the rows: a batch's
    rows are forwarded a few at a time (one at least) and their metrics summed chunk by chunk;
    with a causal-lm `head` (stages/tasks/lm_head.py) the model gives hidden states and the logits are
    made per chunk of tokens, so not even one row's (L x V) logits are built."""
    logits = tasks.get(task).logits if task is None or isinstance(task, str) else task.logits
    model.eval()
    total = torch.zeros(sums_size(), dtype=sum_dtype(device), device=device)
    width = head.linear.out_features if head is not None else None
    for x, y in batches:
        n, a = len(y), 0
        while a < n:
            # The first forward is one row: the model's width is not known before it.
            per_row = (x["input_ids"].shape[1] if isinstance(x, dict) else 1) * (width or 0)
            rows = (
                n if head is not None else 1 if not per_row else logits_mb * 2**20 // (4 * per_row)
            )
            b = min(n, a + max(1, int(rows)))
            xs = to_device(_rows(x, a, b), device)
            ys = to_device(y[a:b], device).reshape(-1)
            with autocast(device, precision):
                out = head.hidden(xs) if head is not None else logits(model, xs)
            width = width or out.shape[-1]
            chunk = max(1, lm_loss.chunk_tokens(logits_mb, width, "--eval-logits-mb") // 4)
            total += _chunked_sums(out.reshape(len(ys), -1), ys, chunk, device, precision, head)
            a = b
    return total


def _rows(x, a: int, b: int):
    return {k: v[a:b] for k, v in x.items()} if isinstance(x, dict) else x[a:b]


def _chunked_sums(out, labels, chunk: int, device, precision: str, head) -> torch.Tensor:
    """`batch_sums` of logits (or of `head` applied to hidden states) `chunk` rows at a time;
    with a head, only the labeled rows are mapped to logits at all."""
    if head is not None:
        keep = (labels >= 0).nonzero().squeeze(1)  # a sync, in evaluation only
        out, labels = out[keep], labels[keep]
    total = 0
    for a in range(0, len(labels), chunk):
        z = out[a : a + chunk]
        if head is not None:
            with autocast(device, precision):
                z = head.linear(z)
        total = total + batch_sums(z, labels[a : a + chunk])
    return total
