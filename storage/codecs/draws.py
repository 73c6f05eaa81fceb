"""The sampled codec's draws, version 2: counter-based, vectorised over every token, on any device.

docs/FORMAT.md ("sampler 2") specifies them; in short, for a token with probabilities ``p`` (float32,
the device's softmax) at position ``pos`` of row (``sample_id``, ``view``):

1. ``q_i = trunc(2^40 p_i)`` as int64 (exact: a power-of-two scale), ``c = cumsum(q)`` (exact
   integers, so the order of the sum cannot matter), ``Q = c[-1]`` (< 2^41);
2. the token's key ``k = mix(mix(mix(mix(seed) ^ sample_id) ^ view) ^ pos)`` and draw j's word
   ``x_j = mix(k + j * GOLDEN)`` (splitmix64's stream; `mix` is storage/views.py's `_mix`);
3. ``u_j = (x_j >> 11) * 2^-53`` and ``t_j = min(floor(u_j * Q), Q - 1)`` (one IEEE float64
   multiply), and the drawn id is the first i with ``c_i > t_j``.

Every step after the softmax is integer arithmetic or one correctly rounded float64 operation, so
a device reproduces `reference_draws` (plain numpy) bit for bit from the same ``p``. The draws of
``N`` samples are the first ``N`` of any larger count: the budget search draws once.
"""

from __future__ import annotations

import numpy as np
import torch

from kdcache.storage.views import _mix

VERSION = 2
SCALE = 2.0**40
_U64 = 1 << 64
GOLDEN, M1, M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(v: int) -> int:
    # int64 tensors hold uint64 bit patterns: two's complement wraps exactly like uint64.
    return v - _U64 if v >= 1 << 63 else v


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix(x: torch.Tensor) -> torch.Tensor:
    """storage/views.py's `_mix` (splitmix64: add GOLDEN, finalise) on int64 tensors."""
    x = x + _signed(GOLDEN)
    x = (x ^ _srl(x, 30)) * _signed(M1)
    x = (x ^ _srl(x, 27)) * _signed(M2)
    return x ^ _srl(x, 31)


def token_words(seed: int, tokens: dict, n: int) -> torch.Tensor:
    """(tokens, n) int64: the 64-bit words x_j of each token's draws (keys are int64 tensors)."""
    sid = tokens["sample_id"]
    k = mix(torch.full_like(sid, _signed(seed % _U64)))
    k = mix(mix(mix(k ^ sid) ^ tokens["view"]) ^ tokens["position"])
    step = torch.arange(n, device=sid.device, dtype=torch.int64) * _signed(GOLDEN)
    return mix(k[:, None] + step[None, :])


def probabilities(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2^40 p, lse) of tempered logits `s` (tokens, V) float32, computed in place over `s`:
    ``w = exp(s - max)``, ``W = sum(w)`` and ``2^40 p = w / (W * 2^-40)``, one float32 division
    (equal to ``2^40 * (w / W)``, the scale being a power of two).

    The logsumexp ``max + log W`` is also the non-finite check: NaN or +inf anywhere (or every
    logit -inf) makes it non-finite, so no separate pass over the vocabulary is needed."""
    m = s.amax(dim=-1, keepdim=True)
    w = s.sub_(m).exp_()
    total = w.sum(dim=-1, keepdim=True)
    lse = total.log()[:, 0] + m[:, 0]
    return w.div_(total * 2.0**-40), lse


def draw(p: torch.Tensor, words: torch.Tensor, sort: bool = True, work=None) -> torch.Tensor:
    """(tokens, n) int64 drawn ids (sorted per token unless `sort` is False: then in draw order)
    from `p` (tokens, V) float32 holding 2^40 times the probabilities (`probabilities`).

    Work: one int64 (tokens, V) array (from `work`, a `Workspace`, if given), the cumulative
    sums taken in place."""
    shape = p.shape
    c = torch.empty(shape, dtype=torch.int64, device=p.device) if work is None else (
        work.get("sampled.c", shape, torch.int64, p.device)
    )  # fmt: skip
    c.copy_(p)  # truncation toward zero: q_i = trunc(2^40 p_i), exact integers from here on
    c.cumsum_(dim=-1)
    total = c[:, -1:]
    u = _srl(words, 11).to(torch.float64) * 2.0**-53
    t = torch.minimum((u * total.to(torch.float64)).floor_().to(torch.int64), total - 1)
    ids = torch.searchsorted(c, t, right=True)
    return ids.sort(dim=-1).values if sort else ids


def reference_draws(p: np.ndarray, seed: int, sample_id, view, position, n: int) -> np.ndarray:
    """The specification in plain numpy, one token at a time: (tokens, n) sorted int64 ids."""
    p = np.asarray(p, np.float32)
    out = np.empty((len(p), n), np.int64)
    with np.errstate(over="ignore"):
        for t in range(len(p)):
            c = np.cumsum((p[t] * np.float32(SCALE)).astype(np.int64))
            total = int(c[-1])
            k = _mix(np.array([seed % _U64], np.uint64))
            for v in (sample_id[t], view[t], position[t]):
                k = _mix(k ^ np.uint64(int(v) % _U64))
            x = _mix(k + np.arange(n, dtype=np.uint64) * np.uint64(GOLDEN))
            u = (x >> np.uint64(11)).astype(np.float64) * 2.0**-53
            targets = np.minimum(np.floor(u * np.float64(total)).astype(np.int64), total - 1)
            out[t] = np.sort(np.searchsorted(c, targets, side="right"))
    return out


def runs(sorted_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unique ids, their counts uint8, uniques per token uint8) of per-token sorted draws."""
    d = np.asarray(sorted_ids)
    new = np.ones(d.shape, bool)
    new[:, 1:] = d[:, 1:] != d[:, :-1]
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, d.size)).astype(np.uint8)
    return d[new], counts, new.sum(1).astype(np.uint8)


def total_variation(p: torch.Tensor, ids: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per-token TV distance of the empirical distribution of draws `ids` (tokens, n), sorted,
    from `p / scale` (tokens, V): 1/2 (sum over drawn ids |c/n - p| + the mass never drawn)."""
    n = ids.shape[1]
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run = new.cumsum(1) - 1
    counts = torch.zeros_like(ids).scatter_add_(1, run, torch.ones_like(ids))
    q = p.gather(1, ids).double() / scale * new
    c = counts.gather(1, run).double() / n
    return 0.5 * (((c - q).abs() * new).sum(1) + 1 - q.sum(1))


def unique_curve(ids: torch.Tensor) -> torch.Tensor:
    """Mean unique ids per token after the first n draws, n = 1..N, from unsorted (tokens, N)
    draws: an id counts from its first occurrence on (one sort, no loop over n)."""
    tokens, n = ids.shape
    order = torch.sort(ids, dim=1, stable=True)
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = order.values[:, 1:] != order.values[:, :-1]
    first = order.indices[new]  # where each distinct id of a token first appeared
    return torch.bincount(first, minlength=n).cumsum(0).double() / max(1, tokens)
