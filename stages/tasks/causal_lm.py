"""The token-level pieces of stage two for causal language models (task ``causal-lm``).

A batch's inputs are ``{"input_ids", "attention_mask"}`` (B, L), right-padded, and the student's
logits are (B, L, V). Position t predicts the token after t, so the hard loss is the next-token
cross-entropy over the positions whose t and t + 1 are both real tokens, and the stored soft
labels are the logits at the valid positions, packed in row order. Everything else reuses the
classifier's row-level code by turning token positions into rows with labels (-1 = ignored):
padding never enters a loss or a metric.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kdcache.stages.common import data
from kdcache.stages.common.fmt import num, pct
from kdcache.stages.common.hooks import logits_of
from kdcache.stages.tasks import register
from kdcache.stages.tasks.base import Measure
from kdcache.stages.tasks.classification import Classification, hard_loss
from kdcache.storage.errors import UsageError
from kdcache.storage.stream import span


def inputs(ds, ids: np.ndarray):
    """The token ids and mask (and target mask) of rows `ids` of `ds`, right-padded."""
    return data.get_batch(ds, ids, tokens=True)[0]


def logits(model, x) -> torch.Tensor:
    """The model's logits (B, L, V) on token inputs `x`."""
    return logits_of(data.forward_tokens(model, x))


def target_mask(x: dict) -> torch.Tensor:
    """(B, L): the positions whose output is learned and stored. A batch of chat data carries
    `target_mask` (the next token is an assistant token, from the data set's HF-style `labels`);
    any other batch learns at every real token, its `attention_mask`."""
    return x.get("target_mask", x["attention_mask"])


def next_token_labels(
    input_ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, L) int64: ``input_ids[:, t + 1]`` where t is a target (`targets`, by default the
    valid positions) and t + 1 is valid, else -1."""
    valid = mask.bool()
    labels = torch.full_like(input_ids, -1, dtype=torch.int64)
    pairs = (valid if targets is None else targets.bool())[:, :-1] & valid[:, 1:]
    labels[:, :-1] = torch.where(pairs, input_ids[:, 1:].long(), labels[:, :-1])
    return labels


def next_token_loss(
    z: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, targets=None
) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/token) of logits (B, L, V) over the valid pairs.

    ``L = -1/|P| * sum_{(b, t) in P} log softmax(z[b, t])[input_ids[b, t + 1]]`` with
    ``P = {(b, t) : targets[b, t] = mask[b, t + 1] = 1}`` (`targets` defaults to `mask`); 0
    (attached to the graph) when P is empty.
    """
    labels = next_token_labels(input_ids, mask, targets)
    return hard_loss(z.reshape(labels.numel(), -1), labels.reshape(-1))


def valid_tokens(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The logits of the valid positions (T, V), in the packed order of the stored columns."""
    return z[mask.bool()]


def token_labels(mask: torch.Tensor, values: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, L) int64 holding the packed per-token `values` at the valid positions, -1 elsewhere."""
    valid = mask.bool()
    values = torch.as_tensor(values, dtype=torch.int64, device=mask.device)
    if int(valid.sum()) != len(values):
        raise UsageError(
            f"the data has {int(valid.sum())} tokens in these rows but the store {len(values)}: "
            "pass the token data set the store was computed from"
        )
    labels = torch.full(mask.shape, -1, dtype=torch.int64, device=mask.device)
    labels[valid] = values
    return labels


def token_count(x) -> int:
    """The number of target tokens (stored, learned) in a batch of causal-lm inputs."""
    return int(target_mask(x).sum())


def perplexity(loss: float | None) -> float | None:
    """``exp(loss)`` of a mean next-token loss in nats (inf past float range; None stays None)."""
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else math.inf


@register
class CausalLM(Classification):
    """Measured as a classifier of its tokens: every position with a next token is a row labeled
    with that token (loss in nats/token, plus perplexity); agreement compares every stored
    token's teacher top-1. Its loss is the chunked one of stages/tasks/lm_loss.py."""

    name = "causal-lm"
    per_token = True
    codec = "sampled"
    temperature = 1.0  # a language model's own distribution is what its students usually match
    eval_rows = 64
    agree_rows = 512
    augmentable = False
    pseudo_labels = False
    row_fields = ("eval_perplexity",)
    best = ("eval_loss", -1)

    def inputs(self, ds, ids):
        return inputs(ds, ids)

    def logits(self, model, x):
        return logits(model, x)

    def width(self, z, what):
        return int(z.shape[-1])

    def label_rows(self, data, every_row):
        # Every block is used: its labels are its own next tokens.
        return np.full(len(data), -1, np.int64), np.arange(len(data), dtype=np.int64)

    def top1_labels(self, x, top1):
        return token_labels(target_mask(x), top1)

    def check_eval_data(self, ds, width, option="--eval-data"):
        pass  # every block with two tokens has a next-token label

    def eval_batches(self, ds, m: Measure, width, spec="--eval-data"):
        lo, hi = span(len(ds), m.rank, m.world)
        for a in range(lo, hi, m.batch_size):
            x = inputs(ds, np.arange(a, min(hi, a + m.batch_size)))
            yield x, next_token_labels(x["input_ids"], x["attention_mask"], target_mask(x))

    def epoch_metrics(self, model, eval_data, rows, m: Measure, width):
        out = super().epoch_metrics(model, eval_data, rows, m, width)
        return out | {"eval_perplexity": perplexity(out["eval_loss"])}

    def evaluate(self, model, ds, rows, m: Measure, width):
        result = super().evaluate(model, ds, rows, m, width)
        agreement = result.pop("agreement")
        return result | {"perplexity": perplexity(result["loss"]), "agreement": agreement}

    def scores(self, row: dict) -> str:
        return (
            f"eval_loss {num(row['eval_loss'], '.4f')} eval_perplexity "
            f"{num(row['eval_perplexity'], '.2f')} agreement {pct(row['agreement'], 2)}"
        )
