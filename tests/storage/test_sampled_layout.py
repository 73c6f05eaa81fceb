"""The sampled codec's on-disk layouts: layout 2 (id gaps, BYTE_STREAM_SPLIT + zstd) reads back
the same columns as layout 1, fits its byte budget on a peaked teacher, and layout-1 stores keep
reading, verifying and feeding the loss."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kdcache.storage.codecs import sampled_layout
from kdcache.storage.fsio import open_location
from kdcache.storage.reader import CacheReader
from kdcache.storage.stream import CacheStream
from kdcache.storage.writer import StoreWriter
from tests.storage.test_sequences import LENGTHS, T_STORE, settings, write_store

OLD = settings("sampled", samples=50, sample_seed=3, sampler=2)  # as stores before layout 2
NEW = OLD | {"layout": 2}


def test_gaps_round_trip_per_token_and_survive_slicing():
    rng = np.random.default_rng(0)
    per = rng.integers(1, 20, 300)
    ids = np.concatenate([np.sort(rng.choice(131072, n, replace=False)) for n in per])
    g = sampled_layout.gaps(ids, per)
    first = np.cumsum(per) - per
    np.testing.assert_array_equal(g[first], ids[first])  # a token's first id as it is
    assert (np.delete(g, first) >= 1).all()  # ascending ids: every later gap is positive
    np.testing.assert_array_equal(sampled_layout.ids_from_gaps(g, per), ids)
    a, b = 17, 123  # tokens a..b alone (a row slice) decode on their own: gaps are token-local
    sl = slice(first[a], first[b])
    np.testing.assert_array_equal(sampled_layout.ids_from_gaps(g[sl], per[a:b]), ids[sl])


def test_both_layouts_read_back_the_same_columns_loss_and_batches(tmp_path):
    stores = {}
    for name, soft in (("old", OLD), ("new", NEW)):
        write_store(str(tmp_path / name), soft)
        stores[name] = r = CacheReader(str(tmp_path / name))
        assert r.verify() == [], name
        assert r.codec.layout == (2 if name == "new" else 1)
    old, new = stores["old"], stores["new"]
    on_disk = pq.read_schema(tmp_path / "new" / "soft_labels" / "part-00000.parquet").names
    assert "sampled_gaps" in on_disk and "sampled_ids" not in on_disk
    assert "sampled_ids" in pq.read_schema(tmp_path / "old/soft_labels/part-00000.parquet").names
    group = pq.read_metadata(tmp_path / "new" / "soft_labels" / "part-00000.parquet").row_group(0)
    chunks = {group.column(c).path_in_schema: group.column(c) for c in range(group.num_columns)}
    gaps = chunks["sampled_gaps.list.element"]
    assert gaps.compression == "ZSTD" and "BYTE_STREAM_SPLIT" in gaps.encodings
    student = torch.randn(sum(LENGTHS), 40, generator=torch.Generator().manual_seed(1))
    losses = []
    for r in (old, new):
        cols = [r.read_shard(i) for i in range(len(r.shards))]
        losses.append(
            float(
                r.codec.soft_loss(
                    student,
                    {f.name: torch.from_numpy(np.concatenate([c[f.name] for c in cols]))
                     for f in r.codec.token_fields()},
                    T_STORE,
                    T_STORE,
                )
            )
        )  # fmt: skip
    assert losses[0] == losses[1]
    for i in range(len(old.shards)):
        a, b = old.read_shard(i), new.read_shard(i)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    batches = [
        list(CacheStream(str(tmp_path / n), batch_size=3, seed=1, buffer_size=4)) for n in stores
    ]
    for x, y in zip(*batches, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def peaked_store(url: str, soft: dict, rows: int = 12, length: int = 256) -> int:
    """A store of a Zipf teacher over V = 32,768 (exponent 1.6: ~2.7 nats, a trained LM's
    entropy), its ranks permuted per token (XOR with a key: a bijection), N = 50 draws.
    Returns the drawn (id, count) pairs."""
    v = 32768
    g = torch.Generator().manual_seed(0)
    zipf = -1.6 * torch.log1p(torch.arange(v, dtype=torch.float32))
    perm = torch.randperm(v, generator=g)
    header = {
        "format": "kdcache/2", "fingerprint": "f" * 64, "temperature": 1.0,
        "teacher": {"spec": "m:T", "kwargs": {}, "num_classes": v},
        "data": {"spec": "m:D", "kwargs": {}, "num_samples": rows, "fingerprint": "d" * 64},
        "soft_labels": soft | {"num_classes": v}, "features": None, "shard_rows": rows,
        "num_rows": rows, "task": "causal-lm", "precision": "fp32",
    }  # fmt: skip
    store = StoreWriter(open_location(url), header)
    store.prepare()
    pairs = 0
    with store.shard(0) as shard:
        for r in range(rows):
            key = torch.randint(0, v, (length, 1), generator=g)
            s = zipf[perm[None, :] ^ key]
            keys = {"sample_id": np.array([r]), "view": np.zeros(1, np.int32)}
            keys["length"] = np.array([length])
            cols, _ = store.codec.encode(s, keys)
            pairs += len(cols["sampled_ids"])
            shard.add(cols | keys | {"label": np.full(1, -1)})
        shard.stats = {"tokens": rows * length}
    store.publish({})
    return pairs


def test_layout_2_fits_two_and_a_half_bytes_per_pair_plus_one_per_token(tmp_path):
    """Measured on the Parquet file itself: file bytes / stored tokens <= 2.5 x pairs per token
    + 1, where layout 1 takes about 3.4 per pair."""
    sizes = {}
    for name, soft in (("old", OLD), ("new", NEW)):
        soft = soft | {"sample_seed": 0}
        pairs = peaked_store(str(tmp_path / name), soft)
        tokens = 12 * 256
        file = tmp_path / name / "soft_labels" / "part-00000.parquet"
        sizes[name] = file.stat().st_size / tokens
        assert CacheReader(str(tmp_path / name)).verify() == []
    per_token = pairs / tokens
    assert 10 < per_token < 20  # a peaked teacher: ~16 unique ids of 50 draws
    assert sizes["new"] <= 2.5 * per_token + 1, (sizes, per_token)
    assert sizes["old"] > 3 * per_token  # what layout 1 costs on the same draws
    new = CacheReader(str(tmp_path / "new")).read_shard(0)
    old = CacheReader(str(tmp_path / "old")).read_shard(0)
    np.testing.assert_array_equal(new["sampled_ids"], old["sampled_ids"])


@pytest.mark.parametrize("soft", [OLD, NEW], ids=["layout1", "layout2"])
def test_a_damaged_file_of_either_layout_fails_its_checksum(tmp_path, soft):
    url = str(tmp_path / "s")
    write_store(url, soft)
    path = tmp_path / "s" / "soft_labels" / "part-00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = CacheReader(url).verify()
    assert len(problems) == 1 and "part-00001.parquet: checksum mismatch" in problems[0]
