"""Sampler 2 (storage/codecs/draws.py): its torch form against the plain-numpy reference and the
golden values docs/FORMAT.md gives, the prefix property the budget search uses, and the codec
built on it (chunking does not change the bytes; sampler-1 settings still encode as before)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.storage.codecs import draws
from kdcache.storage.codecs.base import token_keys
from kdcache.storage.codecs.sampled import Sampled
from kdcache.storage.views import _mix

# docs/FORMAT.md, "sampler 2": a dyadic p (exact in float32), seed 0, sample_id 3, view 0, pos 5.
GOLDEN_P = np.array([2.0**-i for i in range(1, 8)] + [2.0**-7], np.float32)
GOLDEN_KEY = 0x5F92A2C6BC191486
GOLDEN_WORDS = [0x6AB1A5775D479441, 0xE6694C97A3F1A851]
GOLDEN_IDS = [0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 3, 3]  # N = 12
GOLDEN_IDS_42 = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 4]  # seed 42, sample_id 3, view 1, pos 0


def keys(sid, view, pos) -> dict:
    return {k: torch.tensor(v, dtype=torch.int64) for k, v in zip(
        ("sample_id", "view", "position"), (sid, view, pos), strict=True)}  # fmt: skip


def test_mix_is_views_splitmix64_on_int64_bit_patterns():
    x = np.array([0, 1, 2**63 + 5, 2**64 - 1, 12345678901234], np.uint64)
    got = draws.mix(torch.from_numpy(x.view(np.int64))).numpy().view(np.uint64)
    np.testing.assert_array_equal(got, _mix(x))


def test_golden_words_and_draws():
    words = draws.token_words(0, keys([3], [0], [5]), 2).numpy().view(np.uint64)
    assert [int(w) for w in words[0]] == GOLDEN_WORDS
    k = _mix(np.array([0], np.uint64))
    for v in (3, 0, 5):
        k = _mix(k ^ np.uint64(v))
    assert int(k[0]) == GOLDEN_KEY
    assert draws.reference_draws(GOLDEN_P[None], 0, [3], [0], [5], 12)[0].tolist() == GOLDEN_IDS
    assert draws.reference_draws(GOLDEN_P[None], 42, [3], [1], [0], 12)[0].tolist() == (
        GOLDEN_IDS_42
    )
    p = torch.from_numpy(GOLDEN_P)[None] * draws.SCALE
    assert draws.draw(p.clone(), draws.token_words(0, keys([3], [0], [5]), 12)).tolist() == [
        GOLDEN_IDS
    ]
    assert draws.draw(p.clone(), draws.token_words(42, keys([3], [1], [0]), 12)).tolist() == [
        GOLDEN_IDS_42
    ]


@pytest.mark.parametrize("vocab", [40, 300, 5000])
def test_torch_matches_the_numpy_reference_bit_for_bit(vocab):
    g = torch.Generator().manual_seed(vocab)
    s = torch.randn(30, vocab, generator=g) * 4
    s[3, 7] = float("-inf")  # an impossible token is never drawn
    p, lse = draws.probabilities(s.clone())
    assert torch.isfinite(lse).all()
    sid = torch.randint(0, 2**40, (30,), generator=g)
    k = {"sample_id": sid, "view": torch.arange(30) % 3, "position": torch.arange(30)}
    got = draws.draw(p.clone(), draws.token_words(11, k, 50))
    ref = draws.reference_draws(p.numpy() / draws.SCALE, 11, *(k[n].numpy() for n in k), 50)
    np.testing.assert_array_equal(got.numpy(), ref)
    assert not (got[3] == 7).any()


def test_the_first_n_draws_are_those_of_any_larger_n_and_the_unique_curve_counts_them():
    g = torch.Generator().manual_seed(0)
    p, _ = draws.probabilities(torch.randn(20, 500, generator=g) * 3)
    k = {"sample_id": torch.arange(20), "view": torch.zeros(20, dtype=torch.int64),
         "position": torch.arange(20)}  # fmt: skip
    many = draws.draw(p.clone(), draws.token_words(5, k, 100), sort=False)
    few = draws.draw(p.clone(), draws.token_words(5, k, 30), sort=False)
    np.testing.assert_array_equal(many[:, :30].numpy(), few.numpy())
    curve = draws.unique_curve(many)
    for n in (1, 7, 30, 100):
        expected = np.mean([len(set(row[:n].tolist())) for row in many])
        assert curve[n - 1].item() == pytest.approx(expected)


def settings(**extra) -> dict:
    return {"codec": "sampled", "dtype": "float16", "num_classes": 700, "samples": 50,
            "sample_seed": 3, **extra}  # fmt: skip


def test_new_stores_record_sampler_2_and_old_settings_keep_sampler_1():
    assert Sampled.configure({"samples": 50, "sample_seed": 0}, "causal-lm")["sampler"] == 2
    assert Sampled(settings(), "causal-lm").version == 1  # a store written before sampler 2
    s = torch.randn(12, 700, generator=torch.Generator().manual_seed(1))
    row = {"sample_id": np.arange(3), "view": np.zeros(3, int), "length": np.array([4, 4, 4])}
    old, _ = Sampled(settings(), "causal-lm").encode(s, row)
    new, _ = Sampled(settings(sampler=2), "causal-lm").encode(s, row)
    assert int(old["sampled_counts"].sum()) == int(new["sampled_counts"].sum()) == 12 * 50
    assert not np.array_equal(old["sampled_ids"], new["sampled_ids"])  # two distinct samplers


def test_sampler_2_columns_match_the_reference_and_do_not_depend_on_chunking():
    codec = Sampled(settings(sampler=2), "causal-lm")
    s = torch.randn(25, 700, generator=torch.Generator().manual_seed(2)) * 3
    row = {"sample_id": np.array([4, 9]), "view": np.zeros(2, int), "length": np.array([10, 15])}
    tok = token_keys(row)
    whole, _, finite = codec.encode_device(s.clone(), tok)
    assert finite.all()
    parts = [codec.encode_device(s[a : a + 7].clone(), {k: v[a : a + 7] for k, v in tok.items()})
             for a in range(0, 25, 7)]  # fmt: skip
    chunked = torch.cat([c["draws"] for c, _, _ in parts])
    np.testing.assert_array_equal(whole["draws"].numpy(), chunked.numpy())
    p, _ = draws.probabilities(s.clone())
    ref = draws.reference_draws(p.numpy() / draws.SCALE, 3, *(tok[n].numpy() for n in tok), 50)
    np.testing.assert_array_equal(whole["draws"].numpy().astype(np.int64), ref)
    cols = codec.finish({"draws": whole["draws"].numpy()})
    assert cols["sampled_n"].dtype == cols["sampled_counts"].dtype == np.uint8
    assert int(cols["sampled_counts"].sum()) == 25 * 50 and len(cols["sampled_n"]) == 25
