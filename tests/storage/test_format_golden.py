"""docs/FORMAT.md's worked examples, recomputed from the standard library, numpy and xxhash alone
(never kdcache's helpers), then checked against what kdcache computes: a reader re-implemented
from the page has values to test against, and the page cannot drift from the code."""

from __future__ import annotations

import hashlib
import re
import struct

import numpy as np
import torch
import xxhash

from tests.conftest import REPO

M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def view_of(seed: int, epoch: int, i: int, views: int) -> int:
    k = epoch - 1
    offset = splitmix64(splitmix64(splitmix64(seed & M64) ^ (k // views)) ^ (i & M64)) % views
    return (offset + k % views) % views


def row_seed(seed: int, i: int, v: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{i}|{v}".encode()).digest()[:8], "little") >> 1


def blake2b_64(dtype: str, shape: tuple, raw: bytes) -> int:
    h = hashlib.blake2b(f"{dtype}|{shape}|".encode(), digest_size=8)
    h.update(raw)
    return int.from_bytes(h.digest(), "little")


def format_page() -> str:
    return (REPO / "docs" / "FORMAT.md").read_text()


def golden_row(recipe: str) -> str:
    [row] = [line for line in format_page().splitlines() if line.startswith(f"| {recipe} |")]
    return row


def test_xxh3_64_of_a_files_bytes():
    assert xxhash.xxh3_64_hexdigest(b"kdcache") == "5893f1aa2d80e428"
    assert "`5893f1aa2d80e428`" in golden_row("`xxh3_64` of a file's bytes")
    from kdcache.storage.integrity import digests

    assert digests(b"kdcache")["xxh3_64"] == "5893f1aa2d80e428"


def test_the_row_generator_seed():
    assert row_seed(0, 7, 2) == 4592564581743942978
    assert "`4592564581743942978`" in golden_row("row-generator seed")
    from kdcache.storage.views import row_generator

    want = torch.Generator().manual_seed(4592564581743942978)
    assert torch.equal(
        torch.randn(4, generator=row_generator(0, 7, 2)), torch.randn(4, generator=want)
    )


def test_input_hash():
    raw = struct.pack("<4f", 0.0, 1.0, 2.0, 3.0)
    assert blake2b_64("torch.float32", (4,), raw) == 10973240029315154270 == 0x9848C7AAFE6D415E
    assert "`10973240029315154270`" in golden_row("`input_hash` of a sample")
    from kdcache.storage.views import input_hashes

    assert int(input_hashes(torch.tensor([[0.0, 1.0, 2.0, 3.0]]))[0]) == 10973240029315154270


def test_the_view_of_each_sample_per_epoch():
    table = [[view_of(0, e, i, 3) for i in range(5)] for e in range(1, 5)]
    assert table == [[0, 1, 1, 2, 1], [1, 2, 2, 0, 2], [2, 0, 0, 1, 0], [2, 1, 2, 1, 2]]
    assert re.findall(r"`(\[[\d, ]+\])`", golden_row("view of sample `i` in epoch `e`")) == [
        str(row) for row in table
    ]
    # every view once per cycle of V epochs, for each sample
    assert all(sorted(col) == [0, 1, 2] for col in zip(*table[:3], strict=True))
    from kdcache.storage.views import chosen_views

    assert [chosen_views(0, e, np.arange(5), 3).tolist() for e in range(1, 5)] == table
