"""The stage-one bench's teacher: a plain-torch causal LM with a real LM's output layer.

`HeadLM` is an embedding (V x hidden), one causal mixing block (each token with its predecessor),
an MLP, a LayerNorm and a hidden x V head without bias: the head's matmul is what a real LM's last
layer costs, and it dominates this teacher's forward as it does a small real LM's. `scale`
multiplies the logits; `calibrate_scale` picks it so the mean entropy is about 2 nats, the peaked
distribution of a trained LM (a random head is near uniform). Weights come from a fixed seed, so
every process (the bare loop, each precompute) builds the same teacher.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.lm_models import entropy, shifted


class HeadLM(nn.Module):
    def __init__(
        self, vocab_size: int = 32768, hidden: int = 512, scale: float = 1.0, seed: int = 0
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab_size, hidden)
        self.mix = nn.Linear(2 * hidden, hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden)
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab_size, bias=False)
        self.scale = float(scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        e = self.embed(input_ids)
        h = torch.tanh(self.mix(torch.cat([e, shifted(e)], -1)))
        h = self.norm(h + self.mlp(h))
        return self.head(h) * self.scale


def calibrate_scale(vocab: int, hidden: int, target: float, probe: torch.Tensor) -> float:
    """The logit scale (bisection in log space) at which the mean entropy on `probe` is `target`."""
    model = HeadLM(vocab, hidden).eval()
    with torch.inference_mode():
        h = model(probe[:, :64]).float()
    lo, hi = 0.1, 100.0
    for _ in range(24):
        mid = (lo * hi) ** 0.5
        if float(entropy(h * mid).mean()) > target:
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5
