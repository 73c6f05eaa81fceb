"""The store format at the storage layer: shard encoding, the writer's commit protocol, URLs."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kdcache.storage.codecs import open_codec
from kdcache.storage.errors import FormatError, UsageError
from kdcache.storage.fsio import open_location
from kdcache.storage.manifest import FORMAT, dumps
from kdcache.storage.reader import CacheReader
from kdcache.storage.shards import decode_table, encode_table, table_to_parquet_bytes
from kdcache.storage.writer import StoreWriter, existing_state, wipe
from tests.conftest import REPO, files_under, teacher_outputs, toy_precompute


@st.composite
def shard_columns(draw):
    codec = draw(st.sampled_from(["dense", "topk"]))
    dtype = draw(st.sampled_from(["float16", "float32"]))
    n, width = draw(st.integers(0, 12)), draw(st.integers(1, 6))
    floats = hnp.arrays(np.float32, (n, width), elements=st.floats(-60000, 60000, width=32))
    cols = {
        "sample_id": draw(hnp.arrays(np.int64, n, elements=st.integers(0, 2**40))),
        "label": draw(hnp.arrays(np.int64, n, elements=st.integers(-1, 1000))),
    }
    if codec == "dense":
        cols["logits"] = draw(floats)
    else:
        cols["topk_indices"] = draw(hnp.arrays(np.int32, (n, width), elements=st.integers(0, 999)))
        cols["topk_logits"] = draw(floats)
        cols["logsumexp"] = draw(hnp.arrays(np.float32, n, elements=st.floats(-50, 50, width=32)))
    soft = {"codec": codec, "dtype": dtype, "num_classes": width, "top_k": width}
    return cols, open_codec(soft), dtype


def _expected(cols: dict, dtype: str) -> dict:
    out = dict(cols, view=np.zeros(len(cols["sample_id"]), np.int32))
    for name in ("logits", "topk_logits"):
        if name in out:
            out[name] = out[name].astype(dtype)
    return out


@settings(max_examples=60, deadline=None)
@given(shard_columns(), st.data())
def test_encode_decode_round_trip_through_parquet(case, data):
    cols, codec, dtype = case
    table = encode_table(cols, codec)
    assert table.column("label").null_count == int((cols["label"] < 0).sum())
    back = decode_table(pq.read_table(io.BytesIO(table_to_parquet_bytes(table))), codec)
    want = _expected(cols, dtype)
    assert set(back) == set(want)
    for name, value in want.items():
        assert back[name].dtype == value.dtype, name
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    # Slices (non-zero offsets) decode to the same rows.
    n = len(cols["sample_id"])
    a = data.draw(st.integers(0, n))
    b = data.draw(st.integers(a, n))
    part = decode_table(table.slice(a, b - a), codec)
    for name, value in want.items():
        np.testing.assert_array_equal(part[name], value[a:b], err_msg=name)


def test_parquet_bytes_are_deterministic():
    cols = {
        "sample_id": np.arange(5),
        "label": np.array([0, -1, 2, 3, -1]),
        "logits": np.linspace(-1, 1, 15, dtype=np.float32).reshape(5, 3),
    }
    codec = open_codec({"codec": "dense", "dtype": "float16", "num_classes": 3})
    one = table_to_parquet_bytes(encode_table(cols, codec))
    two = table_to_parquet_bytes(encode_table({k: v.copy() for k, v in cols.items()}, codec))
    assert one == two


def test_a_store_has_the_same_bytes_from_two_processes(tmp_path):
    """Resume and cache reuse across machines rely on it: the same rows give the same shard and
    chunk bytes in another process (other hash seed, other memory layout), not only in this one."""
    procs = {}
    for name, hashseed in (("a", "1"), ("b", "2")):
        code = (
            "from tests.conftest import toy_precompute; "
            f"toy_precompute({str(tmp_path / name)!r}, features='body', top_k=3, "
            "data_args={'n': 40})"
        )
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        procs[name] = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env)
    assert all(p.wait(timeout=120) == 0 for p in procs.values())
    runs = {name: files_under(tmp_path / name) for name in procs}
    toy_precompute(tmp_path / "here", features="body", top_k=3, data_args={"n": 40})
    here = files_under(tmp_path / "here")
    assert len(here) == 2 * 3 + 1 and any(k.endswith(".parquet") for k in here)
    assert runs["a"] == runs["b"] == here


def header(fingerprint: str = "f" * 64, temperature: float = 2.0, features: bool = True) -> dict:
    return {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "teacher": {"spec": "m:T", "kwargs": {}, "num_classes": 3},
        "data": {"spec": "m:D", "kwargs": {}, "num_samples": 10, "fingerprint": "d" * 64},
        "temperature": temperature,
        "soft_labels": {"codec": "dense", "dtype": "float32", "num_classes": 3},
        "features": (
            {"layer": "x", "pool": "avg", "dtype": "float32", "dim": 5, "chunk_cols": 2}
            if features
            else None
        ),
        "shard_rows": 4,
        "num_rows": 10,
        "task": "classification",
        "precision": "fp32",
    }


@pytest.fixture(params=["path", "file", "memory"])
def url(request, tmp_path):
    if request.param == "memory":
        return request.getfixturevalue("memory_url")
    return str(tmp_path / "store") if request.param == "path" else f"file://{tmp_path}/store"


def _rows(first: int, n: int) -> tuple[dict, np.ndarray]:
    ids = np.arange(first, first + n)
    cols = {
        "sample_id": ids,
        "label": np.where(ids % 4 == 0, -1, ids % 3),
        "logits": (ids[:, None] * np.array([1.0, -0.5, 0.25])).astype(np.float32),
    }
    return cols, (ids[:, None] + np.arange(5) / 10).astype(np.float32)


def test_writer_commits_out_of_order_and_reader_reads_back(url):
    loc = open_location(url)
    assert existing_state(loc, header()) == "empty"
    store = StoreWriter(loc, header())
    store.prepare()
    assert existing_state(loc, header()) == "partial"
    for index in (2, 0, 1):  # any order: shards are independent
        with store.shard(index) as shard:
            first = index * 4
            n = min(4, 10 - first)
            for a in range(first, first + n, 3):  # several batches per shard
                cols, feats = _rows(a, min(3, first + n - a))
                shard.add(cols, feats)
            shard.stats = {"rows": n}
    assert sorted(store.committed()) == [0, 1, 2]
    store.publish({"rows": 10})
    assert existing_state(loc, header()) == "complete"

    r = CacheReader(url)
    assert r.verify() == []
    assert [s["first_row"] for s in r.shards] == [0, 4, 8]
    # dim 5 in chunks of 2 columns: three chunk files per shard, each hashed.
    assert sorted(k for k in r.shards[1]["files"] if "zarr" in k) == [
        "features.zarr/c/1/0",
        "features.zarr/c/1/1",
        "features.zarr/c/1/2",
    ]
    got = [r.read_shard(i) for i in range(3)]
    want_cols, want_feats = _rows(0, 10)
    for name, value in want_cols.items():
        np.testing.assert_array_equal(np.concatenate([g[name] for g in got]), value)
    np.testing.assert_array_equal(np.concatenate([g["features"] for g in got]), want_feats)
    assert sum(b.num_rows for b in r.iter_record_batches()) == 10


def test_publish_refuses_uncommitted_shards(url):
    store = StoreWriter(open_location(url), header(features=False))
    store.prepare()
    with store.shard(0) as shard:
        shard.add(_rows(0, 4)[0])
    with pytest.raises(RuntimeError, match=r"shards \[1, 2\] not committed"):
        store.publish({})
    with pytest.raises(FormatError, match="incomplete"):
        CacheReader(url)


def test_shard_with_wrong_row_count_is_not_committed(url):
    store = StoreWriter(open_location(url), header(features=False))
    store.prepare()
    with (
        pytest.raises(RuntimeError, match="shard 1 got 3 rows, expected 4"),
        store.shard(1) as shard,
    ):
        shard.add(_rows(4, 3)[0])
    with pytest.raises(ZeroDivisionError), store.shard(0) as shard:
        shard.add(_rows(0, 4)[0])
        raise ZeroDivisionError  # an error inside the block: the shard must not commit
    assert store.committed() == {}


def test_markers_of_another_fingerprint_do_not_count(url):
    loc = open_location(url)
    old = StoreWriter(loc, header(fingerprint="a" * 64, features=False))
    old.prepare()
    with old.shard(0) as shard:
        shard.add(_rows(0, 4)[0])
    assert StoreWriter(loc, header(fingerprint="b" * 64, features=False)).committed() == {}


def test_existing_state_refuses_other_settings_naming_the_field(url):
    loc = open_location(url)
    StoreWriter(loc, header(features=False)).prepare()
    with pytest.raises(UsageError, match=r"temperature: 2\.0 -> 3\.0.*--force"):
        existing_state(loc, header(fingerprint="e" * 64, temperature=3.0, features=False))


def test_existing_state_refuses_foreign_folder(url):
    loc = open_location(url)
    loc.write_bytes(b"mine", "notes.txt")
    with pytest.raises(UsageError, match=r"not a kdcache store \(notes\.txt"):
        existing_state(loc, header())


def test_wipe_removes_the_store(url):
    loc = open_location(url)
    store = StoreWriter(loc, header())
    store.prepare()
    loc.write_bytes(dumps({"format": FORMAT}), "manifest.json")
    wipe(loc)
    assert loc.listdir() == []


def test_precompute_on_each_url_kind(url):
    toy_precompute(url, features="body", dtype="float32")
    r = CacheReader(url)
    assert r.verify() == []
    z, _, _ = teacher_outputs(50)
    assert r.num_rows == 50 and len(r.shards) == 4
    np.testing.assert_array_equal(r.read_shard(3)["sample_id"], np.arange(39, 50))
    lse = torch.logsumexp(z[:13] / 4.0, 1).numpy()
    np.testing.assert_allclose(r.read_shard(0)["logsumexp"], lse, rtol=1e-5)
    assert toy_precompute(url, features="body", dtype="float32")["status"] == "hit"


def test_open_location_normalises_urls(tmp_path):
    plain, file_url = open_location(str(tmp_path / "a")), open_location(f"file://{tmp_path}/a")
    assert plain.root == file_url.root == str(tmp_path / "a") and plain.is_local
    mem = open_location("memory://x/y")
    assert not mem.is_local and mem.zarr_store == "memory://x/y"
    with pytest.raises(UsageError, match="empty store URL"):
        open_location("")
    with pytest.raises(UsageError, match="cannot open store URL 'nosuchproto://a'"):
        open_location("nosuchproto://a")


def test_prepare_sweeps_temporaries_a_killed_writer_left(tmp_path):
    loc = open_location(str(tmp_path / "s"))
    StoreWriter(loc, header()).prepare()
    junk = [
        "soft_labels/part-00001.parquet.tmp-0a1b",
        "features.zarr/c/1/0.0a1b.partial",
        "_run.json.tmp-9",
    ]
    for key in junk:
        loc.write_bytes(b"half", key)
    loc.write_bytes(b"{}", "_lock.json.tmp-5")  # someone's lock attempt in flight: not ours
    StoreWriter(loc, header()).prepare()
    assert not any(loc.exists(key) for key in junk)
    assert loc.exists("_lock.json.tmp-5") and loc.exists("features.zarr", "zarr.json")
