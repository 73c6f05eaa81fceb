"""`kdcache.stages.common.hooks`: each pool mode against a hand-written reduction, and the tap's errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdcache.stages.common.hooks import POOLS, FeatureTap, pool
from kdcache.storage.errors import UsageError

T = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5).sin()


@pytest.mark.parametrize(
    ("mode", "manual"),
    [
        # conv layout (N, C, H, W): one value per channel
        ("avg", lambda t: torch.stack([t[n].reshape(3, -1).mean(1) for n in range(2)])),
        ("flatten", lambda t: torch.stack([t[n].reshape(-1) for n in range(2)])),
        # token layout read as (N, T, ...): the mean over tokens and the first token
        ("token-mean", lambda t: sum(t[:, i] for i in range(3)) / 3),
        ("cls", lambda t: t[:, 0]),
    ],
)
def test_pool_matches_manual_reduction(mode, manual):
    got = pool(T, mode)
    torch.testing.assert_close(got, manual(T))


def test_pool_modes_on_three_dims_differ_as_documented():
    t = torch.randn(2, 6, 4)  # (N, C, L) for avg; (N, T, D) for token-mean / cls
    assert pool(t, "avg").shape == (2, 6) and torch.allclose(pool(t, "avg"), t.mean(2))
    assert pool(t, "token-mean").shape == (2, 4) and torch.allclose(
        pool(t, "token-mean"), t.mean(1)
    )
    assert torch.equal(pool(t, "cls"), t[:, 0, :])
    assert pool(t, "flatten").shape == (2, 24)


@pytest.mark.parametrize("mode", POOLS)
def test_pool_leaves_vectors_alone(mode):
    v = torch.randn(5, 7)
    assert torch.equal(pool(v, mode), v)


def test_pool_rejects_unknown_mode():
    with pytest.raises(UsageError, match="max"):
        pool(T, "max")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.head = nn.Linear(6, 2)
        self.unused = nn.Linear(1, 1)

    def forward(self, x):
        return self.head(self.block(x))


def test_tap_captures_named_submodule_and_detaches_on_exit():
    net, x = Net(), torch.randn(3, 4)
    with FeatureTap(net, "block", "avg") as tap:
        net(x)
        torch.testing.assert_close(tap.value, net.block(x))
    assert not net.block._forward_hooks


def test_tap_unknown_layer_suggests_close_names():
    with pytest.raises(UsageError, match=r"'blok' is not a submodule of Net; did you mean block"):
        FeatureTap(Net(), "blok", "avg")


def test_tap_rejects_bad_pool():
    with pytest.raises(UsageError, match="--pool 'sum'"):
        FeatureTap(Net(), "block", "sum")


def test_token_pools_see_real_tokens_only():
    t = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.allclose(pool(t, "token-mean", mask)[0], t[0, :3].mean(0))
    assert torch.allclose(pool(t, "token-mean", mask)[1], t[1].mean(0))
    assert torch.equal(pool(t, "last", mask), torch.stack([t[0, 2], t[1, 4]]))
    assert torch.equal(pool(t, "last"), t[:, -1])
