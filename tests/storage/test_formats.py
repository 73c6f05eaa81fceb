"""kdcache/2 rows keyed by (sample_id, view), no padding on disk, and kdcache/1 stores still read."""

from __future__ import annotations

import ast
import shutil

import numpy as np
import pytest
import torch

from kdcache.storage import codecs
from kdcache.storage.manifest import balanced_shard_rows
from kdcache.storage.reader import CacheReader
from kdcache.storage.stream import CacheStream
from tests.conftest import REPO, teacher_outputs, toy_precompute

FIXTURES = REPO / "tests" / "fixtures"


@pytest.mark.parametrize(
    ("n", "requested", "want"),
    [(1, 65536, 1), (1000, 65536, 1000), (65537, 65536, 32769), (50, 16, 13), (48, 16, 16)],
)
def test_balanced_shard_rows(n, requested, want):
    rows = balanced_shard_rows(n, requested)
    assert rows == want and rows <= requested
    shards = -(-n // rows)
    assert shards == -(-n // requested)  # as many shards as asked for, never more
    assert n - (shards - 1) * rows > rows - shards  # the last shard is never mostly empty


def _payload(r: CacheReader) -> int:
    """The stored values, counted from what reads back: keys, label, codec columns, features."""
    total = 0
    for i in range(len(r.shards)):
        cols = r.read_shard(i)
        # sample_id and label are int64, view int32, features and soft labels at their dtypes
        total += sum(value.nbytes for value in cols.values())
    return total


@pytest.mark.parametrize("n", [1, 1000, 1025])
def test_bytes_per_sample_is_the_payload_and_nothing_is_padded(tmp_path, n):
    # 1025 = shard_rows + 1 with --shard-rows 1024: the case that used to pad a whole chunk.
    out = tmp_path / "s"
    toy_precompute(out, data_args={"n": n}, features="body", shard_rows=1024, batch_size=256)
    r = CacheReader(str(out))
    payload = _payload(r)
    stats = r.manifest["stats"]
    assert stats["bytes_per_sample"] == pytest.approx(payload / n, rel=0.05)
    feature_files = [
        f["bytes"] for s in r.shards for k, f in s["files"].items() if k.startswith("features")
    ]
    # float16, uncompressed: the rows written, plus at most one padded row per shard (equal
    # shards leave the last one at most shards - 1 rows short of the chunk shape)
    row = r.features_info["dim"] * 2
    assert n * row <= sum(feature_files) <= (n + len(r.shards) - 1) * row
    if n >= 1000:  # Parquet's fixed per-file footer is amortised: disk is no bigger than that
        assert stats["disk_bytes_per_sample"] <= 1.05 * payload / n


def test_rows_are_keyed_by_sample_and_view(tmp_path):
    toy_precompute(tmp_path / "s", data_args={"n": 50})
    r = CacheReader(str(tmp_path / "s"))
    ids, views = r.keys()
    np.testing.assert_array_equal(ids, np.arange(50))
    np.testing.assert_array_equal(views, np.zeros(50))
    want = np.array([49, 0, 13, 26, 7])
    np.testing.assert_array_equal(r.rows_of(want), want)
    with pytest.raises(KeyError, match="sample_id 50 view 0"):
        r.rows_of(np.array([3, 50]))
    with pytest.raises(KeyError, match="sample_id 3 view 1"):
        r.rows_of(np.array([3]), view=1)


def test_rows_of_follows_the_stored_keys_not_positions(tmp_path):
    """A store whose rows are not in sample order, some samples with two views."""
    from kdcache.storage.fsio import open_location
    from kdcache.storage.writer import StoreWriter
    from tests.storage.test_store import header

    h = header(features=False)
    store = StoreWriter(open_location(str(tmp_path / "s")), h)
    store.prepare()
    ids = np.array([5, 2, 2, 9, 0, 5, 7, 1, 3, 4])
    views = np.array([0, 0, 1, 0, 0, 1, 0, 0, 0, 0])
    for i, (a, b) in enumerate([(0, 4), (4, 8), (8, 10)]):
        with store.shard(i) as shard:
            shard.add(
                {
                    "sample_id": ids[a:b],
                    "view": views[a:b],
                    "label": np.full(b - a, -1),
                    "logits": np.zeros((b - a, 3), np.float32),
                }
            )
    store.publish({"rows": 10})
    r = CacheReader(str(tmp_path / "s"))
    np.testing.assert_array_equal(r.keys()[0], ids)
    np.testing.assert_array_equal(r.rows_of([2, 5, 9, 0], view=[1, 1, 0, 0]), [2, 5, 3, 4])
    np.testing.assert_array_equal(r.rows_of([2, 5]), [1, 0])


@pytest.mark.parametrize("name", ["kdcache1-topk", "kdcache1-dense"])
def test_kdcache1_fixtures_read_verify_and_stream(tmp_path, name):
    """Stores written by the kdcache/1 writer (committed fixtures) read with today's code, and
    hold the numbers the teacher computes today."""
    url = str(shutil.copytree(FIXTURES / name, tmp_path / name))
    r = CacheReader(url)
    assert r.format == "kdcache/1" and r.verify() == []
    z, body, _ = teacher_outputs(10, {"num_classes": 5, "dim": 4})
    s = (z / r.temperature).numpy()
    cols = [r.read_shard(i) for i in range(len(r.shards))]
    got = {k: np.concatenate([c[k] for c in cols]) for k in cols[0]}
    np.testing.assert_array_equal(got["sample_id"], np.arange(10))
    np.testing.assert_array_equal(got["view"], np.zeros(10))
    np.testing.assert_array_equal(
        got["label"], np.where(np.arange(10) % 4 == 0, -1, np.arange(10) % 5)
    )
    if r.codec.name == "topk":
        np.testing.assert_array_equal(got["topk_indices"], np.argsort(-s, 1)[:, :3])
        np.testing.assert_allclose(got["logsumexp"], torch.logsumexp(z / 4.0, 1), rtol=1e-5)
        np.testing.assert_allclose(got["features"], body.mean(-1).numpy(), rtol=2e-3, atol=2e-3)
    else:
        np.testing.assert_allclose(got["logits"].astype(np.float32), s, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(r.rows_of([9, 0]), [9, 0])
    batches = list(CacheStream(url, batch_size=4, seed=1))
    assert sorted(np.concatenate([b["sample_id"].numpy() for b in batches])) == list(range(10))


# Codec names may appear as values (a default, a test fixture), never in a comparison or a
# dict lookup that decides behaviour: that belongs in the codec's own module.
def test_nothing_outside_the_codec_modules_branches_on_a_codec_name():
    names = set(codecs.names())
    offenders = []
    for folder in ("storage", "stages", "pipeline"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if "codecs" in path.parts:
                continue
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Compare):
                    parts = [node.left, *node.comparators]
                elif isinstance(node, ast.Subscript):
                    parts = [node.slice]
                elif isinstance(node, ast.Constant) and node.value in ("top_k", "topk_indices"):
                    parts = [node]
                else:
                    continue
                for p in parts:
                    if isinstance(p, ast.Constant) and (p.value in names or p.value == "top_k"):
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders
