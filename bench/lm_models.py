"""The language-model bench's teacher, student and token data (importable specs for precompute).

A random-init GPT's softmax over a large vocabulary is near uniform (N = 50 draws then hit ~50
unique ids), so the byte counts of a sampled store would say nothing about a trained teacher's.
`ZipfLM` instead gives every token a Zipf distribution, p(rank r) ~ r^-exponent, over a vocabulary
permuted per context (a fixed random permutation XOR a key drawn from the (previous,
current) token pair: a bijection of a power-of-two vocabulary, different for every context), plus a small learned-looking perturbation from a linear head, which is also the d x V
matmul a real LM's last layer costs. `calibrate` picks the exponent that gives a trained LM's
mean entropy (the bench asks for 2.75 nats); the bench reports what it measured.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def shifted(x: torch.Tensor) -> torch.Tensor:
    """x with each position holding its predecessor's value (zeros at position 0)."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


class CausalMix(nn.Module):
    """Embedding, a mix of each token with its predecessor, a head to V logits: causal by design."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.mix = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """What the head maps to logits: with `get_output_embeddings`, the declared head that
        stage two fuses into its loss (stages/tasks/lm_head.py)."""
        e = self.embed(input_ids)
        return torch.tanh(self.mix(torch.cat([e, shifted(e)], -1)))

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden_states(input_ids))


class ZipfLM(nn.Module):
    """Logits (B, L, V) of a Zipf law over a per-context permutation of a power-of-two vocabulary."""

    def __init__(
        self,
        vocab_size: int = 32768,
        exponent: float = 1.6,
        dim: int = 64,
        noise: float = 0.5,
        seed: int = 0,
    ):
        super().__init__()
        if vocab_size < 2 or vocab_size & (vocab_size - 1):
            raise ValueError(f"ZipfLM needs a power-of-two vocab_size, got {vocab_size}")
        torch.manual_seed(seed)
        self.vocab_size = vocab_size
        self.net = CausalMix(vocab_size, dim)
        # tanh features are ~0.5 in size: this makes the head's logits ~noise in std.
        nn.init.normal_(self.net.head.weight, std=2 * noise / dim**0.5)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "perm", torch.randperm(vocab_size, generator=g).int(), persistent=False
        )
        self.set_exponent(exponent)

    def set_exponent(self, exponent: float) -> None:
        ranks = torch.arange(self.vocab_size, dtype=torch.float32)
        self.register_buffer("zipf", -exponent * torch.log1p(ranks), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        key = ((input_ids * 40503 + shifted(input_ids) * 9973 + 7) % self.vocab_size).int()
        rank = self.perm ^ key[..., None]  # int32 and index_select: ~4x faster than int64 gather
        zipf = self.zipf.index_select(0, rank.reshape(-1)).view(rank.shape)
        return zipf + self.net(input_ids)


def entropy(z: torch.Tensor) -> torch.Tensor:
    """Per-token entropy (nats) of softmax(z) over the last axis."""
    logp = torch.log_softmax(z.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def calibrate(model: ZipfLM, probe: torch.Tensor, target: float, steps: int = 14) -> float:
    """The exponent (bisection) at which `model`'s mean entropy on `probe` ids is `target` nats."""
    lo, hi = 0.5, 4.0  # entropy falls as the exponent grows
    probe = probe[:, :64]
    with torch.inference_mode():
        for _ in range(steps):
            mid = (lo + hi) / 2
            model.set_exponent(mid)
            if float(entropy(model(probe)).mean()) > target:
                lo = mid
            else:
                hi = mid
    model.set_exponent((lo + hi) / 2)
    return (lo + hi) / 2


class Blocks:
    """n seeded blocks of `length` uniform random token ids below `vocab`, with a vectorised
    `get_batch` (every token real: the masks are all ones)."""

    def __init__(self, n: int = 32, length: int = 256, vocab: int = 32768, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.ids = rng.integers(0, vocab, (n, length), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.ids[i])

    def get_batch(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        x = self.ids[ids]
        return {"input_ids": x, "attention_mask": np.ones_like(x)}


def next_token_ce(z: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats/token) of position t's logits to token t+1, where both are real."""
    keep = (mask[:, :-1] & mask[:, 1:]).bool()
    return nn.functional.cross_entropy(z[:, :-1][keep].float(), input_ids[:, 1:][keep])
