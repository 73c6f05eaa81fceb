"""Token-level codecs on the sequence axis: rows of varying length, nothing padded, packed batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcache.storage.codecs import open_codec
from kdcache.storage.codecs.dense import soft_loss_dense
from kdcache.storage.codecs.sampled import Sampled
from kdcache.storage.fsio import open_location
from kdcache.storage.reader import CacheReader
from kdcache.storage.stream import CacheStream
from kdcache.storage.writer import StoreWriter

V, T_STORE = 40, 2.0
LENGTHS = [5, 1, 7, 3, 6, 2, 4, 8, 5, 3]


def teacher_tokens(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, V, generator=g) * 3 for n in LENGTHS]


def settings(codec: str, **extra) -> dict:
    return {"codec": codec, "dtype": "float32", "num_classes": V, **extra}


def write_store(url: str, soft: dict, shard_rows: int = 4) -> list[torch.Tensor]:
    """A causal-lm store of LENGTHS rows written the way precompute does, batch by batch."""
    z = teacher_tokens()
    header = {
        "format": "kdcache/2",
        "fingerprint": "f" * 64,
        "teacher": {"spec": "m:T", "kwargs": {}, "num_classes": V},
        "data": {"spec": "m:D", "kwargs": {}, "num_samples": len(z), "fingerprint": "d" * 64},
        "temperature": T_STORE,
        "soft_labels": soft,
        "features": None,
        "shard_rows": shard_rows,
        "num_rows": len(z),
        "task": "causal-lm",
        "precision": "fp32",
    }
    store = StoreWriter(open_location(url), header)
    store.prepare()
    for i, a in enumerate(range(0, len(z), shard_rows)):
        with store.shard(i) as shard:
            for b in range(a, min(len(z), a + shard_rows), 3):  # batches of <= 3 rows
                rows = range(b, min(len(z), a + shard_rows, b + 3))
                keys = {
                    "sample_id": np.array(rows),
                    "view": np.zeros(len(rows), np.int32),
                    "length": np.array([LENGTHS[r] for r in rows]),
                }
                s = torch.cat([z[r] for r in rows]) / T_STORE
                cols, stats = store.codec.encode(s, keys)
                cols.update(keys, label=np.full(len(rows), -1))
                shard.add(cols)
                shard.stats = {k: shard.stats.get(k, 0) + v for k, v in stats.items()}
    store.publish({"rows": len(z)})
    return z


@pytest.mark.parametrize(
    "soft",
    [settings("topk", top_k=4), settings("dense"), settings("sampled", samples=50, sample_seed=3)],
    ids=["topk", "dense", "sampled"],
)
def test_rows_keep_their_length_and_batches_come_packed_in_row_order(tmp_path, soft):
    url = str(tmp_path / "s")
    z = write_store(url, soft)
    r = CacheReader(url)
    assert r.verify() == []
    assert r.schema().field("length").type == "int32"
    # the stored tokens are exactly the rows' tokens: nothing padded
    shard = r.read_shard(0)
    np.testing.assert_array_equal(shard["length"], LENGTHS[:4])
    tokens = sum(LENGTHS[:4])
    for name, value in shard.items():
        if name not in ("sample_id", "view", "label", "length", "sampled_ids", "sampled_counts"):
            assert len(value) == tokens, name
    for workers in (0, 2):
        stream = CacheStream(url, batch_size=3, seed=1, buffer_size=4, num_workers=workers)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        seen = []
        for batch in loader:
            ids, lengths = batch["sample_id"].tolist(), batch["length"].tolist()
            assert lengths == [LENGTHS[i] for i in ids]
            zt = torch.cat([z[i] for i in ids]) / T_STORE  # the teacher's tokens, in row order
            top1 = r.codec.teacher_top1({k: v.numpy() for k, v in batch.items()})
            if soft["codec"] == "topk":
                want = torch.topk(zt, 4, dim=1)
                np.testing.assert_array_equal(batch["topk_indices"], want.indices)
                np.testing.assert_allclose(batch["topk_logits"], want.values, rtol=1e-6)
                np.testing.assert_array_equal(top1, zt.argmax(1))
            elif soft["codec"] == "dense":
                np.testing.assert_allclose(batch["logits"], zt, rtol=1e-6)
            else:
                assert len(batch["sampled_n"]) == sum(lengths)
                assert int(batch["sampled_counts"].sum()) == 50 * sum(lengths)
            seen += ids
        assert sorted(seen) == list(range(len(LENGTHS)))


def test_topk_with_k_equal_to_v_is_dense(tmp_path):
    write_store(str(tmp_path / "k"), settings("topk", top_k=V))
    write_store(str(tmp_path / "d"), settings("dense"))
    student = torch.randn(sum(LENGTHS), V, generator=torch.Generator().manual_seed(5))
    losses = []
    for name in ("k", "d"):
        r = CacheReader(str(tmp_path / name))
        cols = [r.read_shard(i) for i in range(len(r.shards))]
        batch = {k: torch.from_numpy(np.concatenate([c[k] for c in cols])) for k in cols[0]}
        stored = {f.name: batch[f.name] for f in r.codec.token_fields()}
        losses.append(float(r.codec.soft_loss(student, stored, T_STORE, T_STORE)))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_sampled_target_is_the_teacher_in_expectation_and_reruns_are_identical(tmp_path):
    """Fixed seeds: pooled over 400 sample_ids (20,000 draws) the empirical distribution of one
    teacher token is within 0.03 (total variation) of softmax(z / T); the sampling noise alone
    gives about 0.5 * sum_i sqrt(2 p_i / (pi n)) ~ 0.015 there, and ~0.25 for one row of 50. And
    every row's draws depend only on (seed, sample_id, view), not on batching."""
    p = torch.softmax(teacher_tokens()[0][:1] / T_STORE, -1)  # one teacher token
    codec = Sampled(settings("sampled", samples=50, sample_seed=7), "causal-lm")
    rows = 400
    s = torch.log(p).repeat(rows, 1)
    keys = {"sample_id": np.arange(rows), "view": np.zeros(rows, int), "length": np.ones(rows, int)}
    cols, stats = codec.encode(s, keys)
    emp = torch.zeros(V)
    ids = torch.from_numpy(cols["sampled_ids"])
    emp.index_add_(0, ids, torch.from_numpy(cols["sampled_counts"]).float())
    emp /= 50 * rows
    assert 0.5 * float((emp - p[0]).abs().sum()) < 0.03
    assert stats["tv_sum"] / rows > 0.05  # a single row is far noisier: the average is the point
    again, _ = codec.encode(s[7:9], {k: v[7:9] for k, v in keys.items()})
    first = int(cols["sampled_n"][:7].sum())
    np.testing.assert_array_equal(
        again["sampled_ids"][: cols["sampled_n"][7]], ids[first : first + cols["sampled_n"][7]]
    )


def test_sampled_loss_is_cross_entropy_to_the_counts_and_refuses_another_temperature():
    codec = Sampled(settings("sampled", samples=4, sample_seed=0), "causal-lm")
    student = torch.randn(2, V)
    batch = {
        "sampled_n": torch.tensor([2, 1]),
        "sampled_ids": torch.tensor([3, 9, 1]),
        "sampled_counts": torch.tensor([3, 1, 4]),
    }
    logq = F.log_softmax(student / 2.0, -1)
    want = -(0.75 * logq[0, 3] + 0.25 * logq[0, 9] + 1.0 * logq[1, 1]) / 2 * 4.0
    assert float(codec.soft_loss(student, batch, 2.0, 2.0)) == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(Exception, match="cannot re-temper"):
        codec.soft_loss(student, batch, 2.0, 1.0)
    dense = soft_loss_dense(
        student, torch.log(torch.tensor([[0.75] * 1 + [0.25] + [1e-9] * (V - 2)] * 2)), 1.0, 1.0
    )
    assert torch.isfinite(dense)


def test_token_ids_take_the_narrowest_unsigned_width():
    for v, width in ((200, 8), (32768, 16), (65536, 16), (65537, 32), (2**31, 32)):
        codec = open_codec(settings("topk", top_k=2) | {"num_classes": v}, "causal-lm")
        assert codec.fields()[0].type.value_type.value_type.bit_width == width
    assert (
        open_codec(settings("topk", top_k=2), "classification").fields()[0].type.value_type
        == "int32"
    )
