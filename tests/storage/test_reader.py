"""CacheReader: what it refuses, what verify catches, and docs/FORMAT.md's plain-pyarrow snippet."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from kdcache.storage.errors import FormatError, IntegrityError
from kdcache.storage.reader import CacheReader
from tests.conftest import REPO, toy_precompute


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reader") / "s"
    toy_precompute(out, features="body", data_args={"n": 50, "every_missing": 4})
    return out


@pytest.fixture
def copy(store, tmp_path) -> Path:
    """A private copy of the module's store that a test may damage."""
    import shutil

    return Path(shutil.copytree(store, tmp_path / "copy"))


def _edit_manifest(root: Path, **changes) -> None:
    doc = json.loads((root / "manifest.json").read_text())
    doc.update(changes)
    (root / "manifest.json").write_text(json.dumps(doc))


def test_unknown_format_version_is_refused_with_url(copy):
    _edit_manifest(copy, format="kdcache/9")
    with pytest.raises(FormatError) as info:
        CacheReader(str(copy))
    assert str(copy) in str(info.value) and "'kdcache/9'" in str(info.value)


def test_manifest_without_required_field_is_refused(copy):
    doc = json.loads((copy / "manifest.json").read_text())
    del doc["shards"]
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="lacks 'shards'"):
        CacheReader(str(copy))


def test_incomplete_store_is_refused(copy):
    (copy / "manifest.json").unlink()
    with pytest.raises(FormatError, match="incomplete kdcache store.*rerun the same"):
        CacheReader(str(copy))


def test_missing_store_and_damaged_manifest(tmp_path, copy):
    with pytest.raises(FormatError, match="not a kdcache store"):
        CacheReader(str(tmp_path / "nothing"))
    (copy / "manifest.json").write_text('{"format": "kdc')
    with pytest.raises(FormatError, match="not valid JSON"):
        CacheReader(str(copy))


def test_reader_api(store):
    r = CacheReader(str(store))
    assert (len(r), r.num_rows, len(r.shards), r.codec.name, r.codec.k, r.num_classes) == (
        50,
        50,
        4,
        "topk",
        8,
        10,
    )
    # --shard-rows 16 over 50 rows: 4 shards, made equal (13 rows; the last 11).
    assert [s["rows"] for s in r.shards] == [13, 13, 13, 11]
    assert r.has_features and r.features_info["dim"] == 16
    shard = r.read_shard(1)
    np.testing.assert_array_equal(shard["sample_id"], np.arange(13, 26))
    np.testing.assert_array_equal(shard["view"], np.zeros(13, np.int32))
    np.testing.assert_array_equal(
        shard["label"], np.where(np.arange(13, 26) % 4 == 0, -1, np.arange(13, 26) % 10)
    )
    assert shard["features"].shape == (13, 16) and shard["features"].dtype == np.float16
    assert "features" not in r.read_shard(1, features=False)
    assert r.shard_table(2).schema.equals(r.schema())


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_read_features_equals_zarr_for_every_range(tmp_path, compression, memory_url):
    # 50 rows in shards of 16: the last shard is short, its chunk padded to 16 rows by zarr.
    for url in (str(tmp_path / "s"), memory_url):
        toy_precompute(url, features="body", feature_compression=compression)
        r = CacheReader(url)
        assert r._raw_layout() == (compression == "none")  # the direct read is taken, or not
        want = r.features[:]
        for start, stop in [(0, 16), (3, 9), (16, 32), (48, 50), (32, 50), (10, 40), (7, 7)]:
            got = r.read_features(start, stop)
            assert got.dtype == want.dtype and got.flags.writeable
            np.testing.assert_array_equal(got, want[start:stop])


@pytest.mark.parametrize(
    "verify, message", [(True, "c/1/0 does not match the checksum"), (False, "c/1/0: .* is short")]
)
def test_short_raw_feature_chunk_is_an_integrity_error(copy, verify, message):
    chunk = copy / "features.zarr" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(IntegrityError, match=message):
        CacheReader(str(copy), verify=verify).shard_features(1)


def test_read_features_without_features_is_refused(tmp_path):
    toy_precompute(tmp_path / "s", data_args={"n": 10})
    with pytest.raises(FormatError, match="stores no features"):
        CacheReader(str(tmp_path / "s")).read_features(0, 2)


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "key", ["soft_labels/part-00002.parquet", "features.zarr/c/1/0", "features.zarr/zarr.json"]
)
def test_verify_names_a_flipped_byte(copy, key):
    r = CacheReader(str(copy))
    assert r.verify() == []
    _flip_byte(copy / key, len((copy / key).read_bytes()) // 2)
    problems = r.verify()
    assert problems == [f"{copy / key}: checksum mismatch (file changed or corrupt)"]
    with pytest.raises(IntegrityError, match=re.escape(key)):
        r.check_integrity()


def test_verify_names_missing_and_resized_files(copy):
    (copy / "soft_labels/part-00001.parquet").unlink()
    with (copy / "features.zarr/c/3/0").open("ab") as f:
        f.write(b"x")
    problems = CacheReader(str(copy)).verify()
    assert f"{copy}/soft_labels/part-00001.parquet: missing" in problems
    assert any(p.startswith(f"{copy}/features.zarr/c/3/0: checksum mismatch") for p in problems)


def test_verify_checks_row_counts(copy):
    doc = json.loads((copy / "manifest.json").read_text())
    doc["shards"][3]["rows"] = 12
    (copy / "manifest.json").write_text(json.dumps(doc))
    problems = CacheReader(str(copy)).verify()
    assert any("part-00003.parquet: 11 rows, manifest says 12" in p for p in problems)
    assert any("shards hold 51 rows, manifest says 50" in p for p in problems)


def _format_snippet() -> str:
    text = (REPO / "docs" / "FORMAT.md").read_text()
    block = text.split("<!-- read-snippet -->", 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


@pytest.mark.parametrize("kind", ["topk-local", "dense-memory", "kdcache1-topk", "kdcache1-dense"])
def test_format_md_snippet_reads_a_store(tmp_path, memory_url, kind):
    """The ~15 lines in docs/FORMAT.md, run as written, give what CacheReader gives, for a store
    of today's format and for the committed kdcache/1 stores."""
    if kind == "topk-local":
        url = str(tmp_path / "s")
        toy_precompute(url, features="body", data_args={"n": 40, "every_missing": 3})
    elif kind == "dense-memory":
        url = memory_url
        toy_precompute(url, codec="dense", data_args={"n": 40})
    else:
        url = str(REPO / "tests" / "fixtures" / kind)
    ns = {"URL": url}
    exec(compile(_format_snippet(), "FORMAT.md", "exec"), ns)
    r = CacheReader(url)
    assert r.format == ("kdcache/1" if kind.startswith("kdcache1") else "kdcache/2")
    last = r.read_shard(len(r.shards) - 1)
    np.testing.assert_array_equal(ns["ids"], last["sample_id"])
    np.testing.assert_array_equal(ns["views"], last["view"])
    np.testing.assert_array_equal(ns["labels"], last["label"])
    if "topk" in kind:
        np.testing.assert_array_equal(ns["idx"], last["topk_indices"])
        np.testing.assert_array_equal(ns["s"], last["topk_logits"])
        p = np.exp(last["topk_logits"].astype(np.float32) - last["logsumexp"][:, None])
        np.testing.assert_allclose(ns["p"], p)
        np.testing.assert_array_equal(ns["f"], last["features"])
    else:
        np.testing.assert_array_equal(ns["s"], last["logits"])
        assert ns["f"] is None
