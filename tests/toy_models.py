"""Tiny teachers and data sets the stage-one tests build by spec (`tests.toy_models:ToyNet`).

Everything is seeded, so two processes that build the same spec get the same weights and samples.
The bad ones exist to prove that each way a user's code can be wrong gives one clear error.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn

IN_DIM = 8
TOKENS = 4
FORBID_ENV = "KDCACHE_TOY_FORBID_FORWARD"


class Body(nn.Module):
    """(B, IN_DIM) -> (B, dim, TOKENS): a conv-like layout so every pool mode differs."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(IN_DIM, dim * TOKENS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x)).view(len(x), self.dim, TOKENS)


class _Logits:
    def __init__(self, logits: torch.Tensor):
        self.logits = logits


class ToyNet(nn.Module):
    """A seeded classifier with a `body` submodule.

    sleep: seconds per forward (to make a run slow enough to kill); count_file: append one line per
    forward (to prove a cache hit runs none); out: how the logits are wrapped (tensor, dict, tuple,
    object); sabotage: a path the first forward creates as a regular file (to break a store);
    stamp_file: append the time of every forward. With KDCACHE_TOY_FORBID_FORWARD set, forward raises.
    """

    def __init__(
        self,
        num_classes: int = 10,
        dim: int = 16,
        seed: int | None = 0,  # None: torch's random initial weights, as an untrained spec has
        sleep: float = 0.0,
        count_file: str | None = None,
        out: str = "tensor",
        scale: float = 3.0,
        sabotage: str | None = None,
        stamp_file: str | None = None,
    ):
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.body = Body(dim)
        self.head = nn.Linear(dim, num_classes)
        self.spare = nn.Identity()  # never called by forward
        self.sleep, self.count_file, self.out, self.scale = sleep, count_file, out, scale
        self.sabotage, self.stamp_file = sabotage, stamp_file

    def forward(self, x: torch.Tensor):
        if os.environ.get(FORBID_ENV):
            raise RuntimeError("ToyNet.forward called while forbidden")
        if self.count_file:
            with open(self.count_file, "a") as f:
                f.write(f"{len(x)}\n")
        if self.sleep:
            time.sleep(self.sleep)
        if self.stamp_file:  # when each forward ran (to show two runs overlapping in time)
            with open(self.stamp_file, "a") as f:
                f.write(f"{time.time()}\n")
        if self.sabotage and not os.path.exists(self.sabotage):
            with open(self.sabotage, "w") as f:
                f.write("not a folder")
        z = self.head(self.body(x).mean(-1)) * self.scale
        if self.out == "dict":
            return {"logits": z, "extra": z * 0}
        if self.out == "tuple":
            return (z, z * 0)
        if self.out == "object":
            return _Logits(z)
        return z


class NaNNet(ToyNet):
    """Returns NaN for the rows whose first input is above `threshold` (all rows by default)."""

    def __init__(self, threshold: float = -1e9, inf: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.threshold, self.inf = threshold, inf

    def forward(self, x):
        z = super().forward(x)
        bad = float("inf") if self.inf else float("nan")
        return torch.where((x[:, 0] > self.threshold)[:, None], torch.full_like(z, bad), z)


class WrongShapeNet(ToyNet):
    def forward(self, x):
        return super().forward(x)[:, :, None].expand(-1, -1, 2)


class NotAModule:
    def __call__(self, x):
        return x


class RegNet(nn.Module):
    """A regression teacher with `outputs` values per sample (1 gives a (B,) output)."""

    def __init__(self, outputs: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(IN_DIM, 8)
        self.head = nn.Linear(8, outputs)
        self.outputs = outputs

    def forward(self, x):
        y = self.head(torch.relu(self.body(x)))
        return y[:, 0] if self.outputs == 1 else y


class LinearReg(nn.Module):
    """A seeded linear map IN_DIM -> `outputs` (1 gives a (B,) output): a regression teacher or
    student whose optimum is known in closed form."""

    def __init__(self, outputs: int = 2, seed: int = 0, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(seed)
        self.head = nn.Linear(IN_DIM, outputs)
        with torch.no_grad():
            self.head.weight.mul_(scale)
            self.head.bias.mul_(scale)
        self.outputs = outputs

    def forward(self, x):
        y = self.head(x)
        return y[:, 0] if self.outputs == 1 else y


class RegData:
    """(x, float target) items: target = x @ W + noise, W fixed, `width` values per item (1 gives a
    scalar). every_missing=m makes every m-th target None; bad_index gets a NaN target (`bad` =
    "nan") or one of another width ("width"); vectorised=True serves `get_batch(ids)` instead."""

    def __init__(
        self,
        n: int = 64,
        width: int = 2,
        seed: int = 0,
        every_missing: int = 0,
        noise: float = 0.1,
        scale: float = 1.0,
        bad_index: int = -1,
        bad: str = "nan",
        vectorised: bool = False,
    ):
        # One map W for every seed (eval splits share it); the seed draws the inputs and noise.
        self.w = np.random.default_rng(1000).standard_normal((IN_DIM, width)).astype(np.float32)
        rng = np.random.default_rng(seed + 1000)
        self.x = toy_inputs(n, seed)
        y = self.x @ self.w + noise * rng.standard_normal((n, width)).astype(np.float32)
        self.y = (scale * y).astype(np.float32)
        self.width, self.every_missing, self.bad_index, self.bad = (
            width,
            every_missing,
            bad_index,
            bad,
        )
        if vectorised:
            self.get_batch = self._get_batch

    def __len__(self) -> int:
        return len(self.x)

    def target(self, i: int):
        if self.every_missing and i % self.every_missing == 0:
            return None
        y = self.y[i] if self.width > 1 else float(self.y[i, 0])
        if i == self.bad_index:
            return (
                np.append(self.y[i], 1.0)
                if self.bad == "width"
                else np.full_like(self.y[i], np.nan)
            )
        return y

    def __getitem__(self, i: int):
        return torch.from_numpy(self.x[i]), self.target(int(i))

    def _get_batch(self, ids):
        ids = np.asarray(ids)
        return {"input": torch.from_numpy(self.x[ids]), "label": [self.target(int(i)) for i in ids]}


def toy_inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, IN_DIM)).astype(np.float32)


class ToyData:
    """Map-style (x, y) with y = i % num_classes; labels=False gives bare x, every_missing=m makes
    every m-th label missing (an (x, None) item)."""

    def __init__(
        self,
        n: int = 100,
        labels: bool = True,
        num_classes: int = 10,
        seed: int = 0,
        every_missing: int = 0,
    ):
        self.x = toy_inputs(n, seed)
        self.labels, self.num_classes, self.every_missing = labels, num_classes, every_missing

    def __len__(self) -> int:
        return len(self.x)

    def label(self, i: int) -> int | None:
        if not self.labels or (self.every_missing and i % self.every_missing == 0):
            return None
        return i % self.num_classes

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.x[i])
        return x if not self.labels else (x, self.label(i))


class ToyDictData(ToyData):
    def __getitem__(self, i: int):
        item = {"input": self.x[i]}
        if self.label(i) is not None:
            item["label"] = self.label(i)
        return item


class ToyBatchData(ToyData):
    """The same samples through the vectorised `get_batch(ids)` path."""

    def get_batch(self, ids):
        ids = np.asarray(ids)
        y = ids % self.num_classes if self.labels else None
        return {"input": torch.from_numpy(self.x[ids]), "label": y}


class BadLabelData(ToyData):
    def __init__(self, n: int = 40, bad_index: int = 30, bad_label: int = 99, **kwargs):
        super().__init__(n, **kwargs)
        self.bad_index, self.bad_label = bad_index, bad_label

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return x, (self.bad_label if i == self.bad_index else y)


class EmptyData(ToyData):
    def __init__(self, **kwargs):
        super().__init__(0)


class ToyCausalLM(nn.Module):
    """A seeded causal LM: embedding, a causal mix of each token with its predecessor, a head.

    forward(input_ids) -> logits (B, L, V); `body` is a (B, L, dim) layer for token features.
    """

    def __init__(
        self,
        vocab_size: int = 64,
        dim: int = 16,
        seed: int = 0,
        scale: float = 2.0,
        sleep: float = 0,
        use_prev: bool = True,
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab_size, dim)
        self.body = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, vocab_size)
        self.scale, self.sleep, self.use_prev = scale, sleep, use_prev

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.sleep:
            time.sleep(self.sleep)
        e = self.embed(input_ids)
        prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
        if not self.use_prev:  # the next token depends on this one only (a bigram teacher)
            prev = torch.zeros_like(prev)
        return self.head(torch.tanh(self.body(torch.cat([e, prev], -1)))) * self.scale


class ToyTokens:
    """n seeded token blocks of lengths between min_len and max_len (1-D int64 tensors), or dict
    items with an attention mask that zeroes a tail when `masked` is set."""

    def __init__(
        self,
        n: int = 24,
        vocab: int = 64,
        min_len: int = 3,
        max_len: int = 12,
        seed: int = 0,
        masked: bool = False,
    ):
        g = np.random.default_rng(seed)
        lengths = g.integers(min_len, max_len + 1, n)
        self.items = [g.integers(0, vocab, k).astype(np.int64) for k in lengths]
        self.masked = masked

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        ids = torch.from_numpy(self.items[i])
        if not self.masked:
            return ids
        mask = torch.ones_like(ids)
        mask[len(ids) - len(ids) // 3 :] = 0
        return {"input_ids": ids, "attention_mask": mask}


class OddHeadLM(ToyCausalLM):
    """A causal LM whose declared output layer (`get_output_embeddings`) is one wider than the
    logits it returns: a fused head must refuse it."""

    def __init__(self, vocab_size: int = 64, dim: int = 16, seed: int = 0):
        super().__init__(vocab_size, dim, seed)
        self.wide = nn.Linear(dim, vocab_size + 1)

    def hidden_states(self, input_ids, attention_mask=None):
        return torch.zeros(*input_ids.shape, self.wide.in_features)

    def get_output_embeddings(self):
        return self.wide
