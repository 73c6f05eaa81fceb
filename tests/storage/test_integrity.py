"""Integrity on read: every store file a reader uses is checked against the manifest, once, on the
bytes it decodes; a damaged byte stops it with one line naming the file, the store and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from kdcache.storage import integrity
from kdcache.storage.errors import IntegrityError
from kdcache.storage.reader import CacheReader
from kdcache.storage.stream import CacheStream
from tests.conftest import REPO, toy_precompute

RAW, ZSTD = "none", "zstd"


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """Two toy stores with features: the raw default layout (read directly) and zstd (via zarr)."""
    root = tmp_path_factory.mktemp("integrity")
    out = {}
    for compression in (RAW, ZSTD):
        out[compression] = root / compression
        toy_precompute(out[compression], features="body", feature_compression=compression, top_k=3)
    return out


@pytest.fixture
def copy_of(stores, tmp_path):
    def make(compression: str = RAW) -> Path:
        return Path(shutil.copytree(stores[compression], tmp_path / compression))

    return make


def flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


def epoch(url_or_reader, features: bool = True) -> int:
    stream = CacheStream(url_or_reader, batch_size=8, seed=1, features=features)
    return sum(len(b["sample_id"]) for b in stream)


def listed(root: Path) -> dict[str, dict]:
    return integrity.listed_files(json.loads((root / "manifest.json").read_text()))


@pytest.mark.parametrize(
    "compression, key",
    [
        (RAW, "soft_labels/part-00002.parquet"),
        (RAW, "features.zarr/c/0/0"),
        (RAW, "features.zarr/zarr.json"),
        (ZSTD, "features.zarr/c/1/0"),
        (ZSTD, "features.zarr/zarr.json"),
    ],
)
def test_a_flipped_byte_stops_the_stream(copy_of, compression, key):
    root = copy_of(compression)
    assert epoch(str(root)) == 50
    flip(root / key)
    with pytest.raises(IntegrityError) as info:
        epoch(str(root))
    msg = str(info.value)
    assert "\n" not in msg
    assert f"{root / key} does not match the checksum in the manifest of {root}" in msg
    assert f"`kdcache verify {root}`" in msg


def test_a_flipped_byte_in_a_memory_store_through_zarr(memory_url):
    """Remote stores read features through zarr's FsspecStore, wrapped by the same check."""
    toy_precompute(memory_url, features="body", feature_compression=ZSTD)
    fs, root = fsspec.core.url_to_fs(memory_url)
    key = f"{root}/features.zarr/c/2/0"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(key, bytes(data))
    assert len(CacheReader(memory_url).read_shard(2, features=False)["sample_id"]) > 0
    with pytest.raises(IntegrityError, match="features.zarr/c/2/0 does not match") as info:
        CacheReader(memory_url).read_shard(2)
    # the store is named by its URL, as the user gave it, and so is the command that checks it
    assert f"the manifest of {memory_url}" in str(info.value), str(info.value)
    assert f"`kdcache verify {memory_url}`" in str(info.value)


def test_each_file_is_checked_once_per_reader_on_the_bytes_read(copy_of, monkeypatch):
    root = copy_of()
    seen: list[tuple[str, int]] = []
    conclude = integrity.ReadChecker.conclude

    def counting(self, key, size, h):
        seen.append((h.hexdigest(), size))
        return conclude(self, key, size, h)

    monkeypatch.setattr(integrity.ReadChecker, "conclude", counting)
    reader = CacheReader(str(root))
    for _ in range(3):  # three epochs: a file is checked on its first read only
        assert epoch(reader) == 50
    want = sorted((e["xxh3_64"], e["bytes"]) for e in listed(root).values())
    assert sorted(seen) == want  # every listed file once, at its full recorded size
    assert epoch(CacheReader(str(root))) == 50 and len(seen) == 2 * len(want)  # a new reader


def test_a_reader_checks_only_what_it_reads(copy_of):
    root = copy_of()
    flip(root / "features.zarr/c/0/0")
    assert epoch(str(root), features=False) == 50  # soft labels only: the chunk is never read
    with pytest.raises(IntegrityError, match="c/0/0"):
        epoch(str(root))


def test_no_verify_reads_uses_the_damaged_bytes(copy_of):
    root = copy_of()
    before = CacheReader(str(root)).read_features(0, 13)
    flip(root / "features.zarr/c/0/0", offset=0)  # the first value of row 0
    after = CacheReader(str(root), verify=False).read_features(0, 13)
    assert after[0, 0] != before[0, 0]
    np.testing.assert_array_equal(after[1:], before[1:])
    with pytest.raises(IntegrityError):
        CacheReader(str(root)).read_features(0, 13)


def test_stores_with_only_sha256_are_checked_with_sha256(copy_of):
    """kdcache/1 and early kdcache/2 stores recorded sha256 alone: the reader falls back to it."""
    root = copy_of()
    doc = json.loads((root / "manifest.json").read_text())
    for entry in integrity.listed_files(doc).values():
        assert set(entry) == {"sha256", "xxh3_64", "bytes"}
    for entries in [doc["files"], *(s["files"] for s in doc["shards"])]:
        for entry in entries.values():
            del entry["xxh3_64"]
    (root / "manifest.json").write_text(json.dumps(doc))
    assert epoch(str(root)) == 50
    flip(root / "soft_labels/part-00001.parquet")
    with pytest.raises(IntegrityError, match="part-00001.parquet does not match"):
        epoch(str(root))


def test_a_kdcache1_store_is_checked(tmp_path):
    root = Path(shutil.copytree(REPO / "tests/fixtures/kdcache1-topk", tmp_path / "v1"))
    reader = CacheReader(str(root))
    assert reader.format == "kdcache/1"
    assert all("xxh3_64" not in e for e in listed(root).values())
    rows = sum(len(reader.read_shard(i)["sample_id"]) for i in range(len(reader.shards)))
    assert rows == reader.num_rows
    flip(root / "soft_labels/part-00000.parquet")
    with pytest.raises(IntegrityError, match="part-00000.parquet does not match"):
        CacheReader(str(root)).read_shard(0)


def test_a_listed_file_that_is_missing(copy_of):
    root = copy_of()
    (root / "soft_labels/part-00003.parquet").unlink()
    (root / "features.zarr/c/1/0").unlink()
    with pytest.raises(IntegrityError, match="part-00003.parquet is listed in the manifest"):
        CacheReader(str(root)).read_shard(3)
    with pytest.raises(IntegrityError, match="c/1/0 is listed in the manifest of .* but missing"):
        CacheReader(str(root)).shard_features(1)


def test_unchecked_damaged_parquet_is_one_integrity_line(copy_of):
    root = copy_of()
    key = root / "soft_labels/part-00000.parquet"
    key.write_bytes(key.read_bytes()[:-20])  # the footer is gone: not Parquet any more
    with pytest.raises(IntegrityError, match="part-00000.parquet: unreadable Parquet .*verify"):
        CacheReader(str(root), verify=False).read_shard(0)


def test_the_writer_records_both_checksums_of_the_bytes_on_disk(stores):
    for root in stores.values():
        for key, entry in listed(root).items():
            assert entry == integrity.digests((root / key).read_bytes()), key


def test_an_error_in_a_dataloader_worker_is_the_integrity_error(copy_of):
    root = copy_of()
    flip(root / "soft_labels/part-00000.parquet")
    stream = CacheStream(str(root), batch_size=8, seed=1, num_workers=1)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1)
    with pytest.raises(IntegrityError, match="part-00000.parquet does not match"):
        list(loader)
