"""Evaluation metrics as additive sums (so ranks can all_reduce them) and the per-epoch CSV log.

A batch contributes a float64 vector ``[n, correct, nll_sum, count_b.., confidence_b..,
correct_b..]`` over ``BINS`` equal-width confidence bins; `summarise` turns any sum of such vectors
into accuracy, mean cross-entropy and the expected calibration error
``ECE = sum_b (n_b / n) * |accuracy_b - confidence_b|`` (Guo et al., 2017; 15 bins). For a
causal-lm student the rows are tokens (stages/tasks/causal_lm.py): loss is nats/token, and its rows also carry
``eval_perplexity`` and ``tokens_per_sec``.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import torch

from kdcache.stages.common.device import sum_dtype
from kdcache.stages.tasks import regression_metrics
from kdcache.storage.codecs.losses import upcast

BINS = 15
CSV_FIELDS = (
    "epoch",
    "step",
    "lr",
    "loss",
    "hard_loss",
    "soft_loss",
    "feature_loss",
    "eval_loss",
    "eval_accuracy",
    "eval_ece",
    "agreement",
    "epoch_seconds",
    "samples_per_sec",
    "eval_perplexity",
    "tokens_per_sec",
    "relation_loss",
    *regression_metrics.FIELDS,
)


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


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def epoch_line(row: dict, epochs: int) -> str:
    losses = (
        f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f} (hard {row['hard_loss']:.4f} "
        f"soft {row['soft_loss']:.4f} feature {row['feature_loss']:.4f}"
        + (f" relation {row['relation_loss']:.4f})" if row.get("relation_loss") else ")")
    )
    if "eval_mse" in row:  # a regression run (stages/tasks/regression_metrics.py)
        return f"{losses} {regression_metrics.scores(row)} [{row['epoch_seconds']:.1f}s]"
    if "eval_perplexity" not in row:
        return (
            f"{losses} eval_accuracy {_pct(row['eval_accuracy'])} agreement "
            f"{_pct(row['agreement'])} [{row['epoch_seconds']:.1f}s]"
        )
    return (
        f"{losses} eval_loss {regression_metrics.num(row['eval_loss'], '.4f')} eval_perplexity "
        f"{regression_metrics.num(row['eval_perplexity'], '.2f')} agreement {_pct(row['agreement'])} "
        f"[{row['epoch_seconds']:.1f}s, {regression_metrics.num(row.get('tokens_per_sec'), '.0f')} tokens/s]"
    )


def _rate(rows: list[dict], key: str, seconds: float) -> float | None:
    done = sum(r[key] * r["epoch_seconds"] for r in rows if r.get(key))
    return done / seconds if seconds else None


def run_totals(rows: list[dict]) -> dict:
    """final and best epochs, train seconds and samples/s of a run's rows. The best epoch has the
    highest eval_accuracy, or for a causal-lm run (rows with perplexity) the lowest eval_loss, or
    for a regression run (rows with eval_mse) the lowest eval_mse."""
    keys = ("epoch", "eval_accuracy", "eval_ece", "agreement", "eval_loss")
    lm, regression = "eval_perplexity" in rows[-1], "eval_mse" in rows[-1]
    metric, sign = ("eval_accuracy", 1)
    if lm:
        keys += ("eval_perplexity",)
        metric, sign = ("eval_loss", -1)
    elif regression:
        keys += regression_metrics.FIELDS
        metric, sign = ("eval_mse", -1)
    final = {k: rows[-1].get(k) for k in keys}
    scored = [r for r in rows if r.get(metric) is not None]
    top = max(scored, key=lambda r: sign * r[metric]) if scored else rows[-1]
    best = {k: top.get(k) for k in keys}
    seconds = sum(r["epoch_seconds"] for r in rows)
    totals = {
        "train_seconds": seconds,
        "samples_per_sec": _rate(rows, "samples_per_sec", seconds),
        "final": final,
        "best": best,
        "test_accuracy": final["eval_accuracy"],
    }
    if lm:
        totals["tokens_per_sec"] = _rate(rows, "tokens_per_sec", seconds)
    return totals


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: _cell(row.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def _cell(v):
    if v is None:
        return ""
    return f"{v:.10g}" if isinstance(v, float) else v


def parse_csv(text: str) -> list[dict]:
    """Rows of a metrics.csv back as numbers (empty cells -> None)."""
    rows = []
    for raw in csv.DictReader(io.StringIO(text)):
        row = {}
        for k, v in raw.items():
            if v in ("", None):
                row[k] = None
            elif k in ("epoch", "step"):
                row[k] = int(v)
            else:
                row[k] = float(v)
        rows.append(row)
    return rows
