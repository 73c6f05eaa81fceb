"""The streaming reader: exactly-once splits, seeded order, stored columns, bounded reading."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kdcache.storage.reader import CacheReader
from kdcache.storage.stream import (
    CacheStream,
    _Prefetcher,
    batch_sizes,
    shuffle_buffer,
    span,
)
from tests.conftest import STREAM_ROWS as N
from tests.conftest import ids_of, toy_precompute


@pytest.mark.parametrize(("workers", "ranks"), [(0, 1), (2, 1), (1, 3), (2, 2)])
def test_every_row_exactly_once_across_ranks_and_workers(stream_store, workers, ranks):
    per_rank = []
    for rank in range(ranks):
        stream = CacheStream(
            stream_store, batch_size=8, buffer_size=20, seed=3, rank=rank, world_size=ranks,
            num_workers=workers, features=workers == 2,
        )  # fmt: skip
        stream.set_epoch(1)
        batches = ids_of(stream, workers)
        assert len(batches) == len(stream) == stream.num_batches(0)  # same steps on every rank
        assert all(4 <= len(b) <= 8 for b in batches)  # at most batch_size, never tiny
        per_rank.append(np.concatenate(batches))
    everything = np.concatenate(per_rank)
    np.testing.assert_array_equal(np.sort(everything), np.arange(N))
    sizes = [len(ids) for ids in per_rank]
    assert max(sizes) - min(sizes) <= max(1, workers)


def test_batch_sizes_are_near_equal():
    assert batch_sizes(10, 3) == [4, 3, 3] and batch_sizes(2, 3) == [1, 1]
    for rows in (1, 9, 100, 1001):
        for count in (1, 2, 7):
            sizes = batch_sizes(rows, count)
            assert sum(sizes) == rows and max(sizes) - min(sizes) <= 1 and min(sizes) > 0


def test_spans_cover_and_differ_by_at_most_one():
    for total in (0, 1, 7, 100, 1001):
        for slots in (1, 2, 3, 8):
            parts = [span(total, s, slots) for s in range(slots)]
            assert parts[0][0] == 0 and parts[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
            sizes = [hi - lo for lo, hi in parts]
            assert max(sizes) - min(sizes) <= 1


def test_same_seed_same_order_other_epoch_or_seed_differs(stream_store):
    def order(seed, epoch):
        s = CacheStream(stream_store, batch_size=8, buffer_size=20, seed=seed, features=False)
        s.set_epoch(epoch)
        return np.concatenate([b["sample_id"].numpy() for b in s])

    a = order(0, 1)
    np.testing.assert_array_equal(a, order(0, 1))
    assert not np.array_equal(a, order(0, 2))
    assert not np.array_equal(a, order(1, 1))
    assert not np.array_equal(a, np.arange(N))  # it is shuffled at all
    s = CacheStream(stream_store, batch_size=8, shuffle=False, features=False)
    np.testing.assert_array_equal(np.concatenate([b["sample_id"] for b in s]), np.arange(N))


def test_unshuffled_batches_are_writable_tensors_not_arrow_views(stream_store):
    import warnings

    reader = CacheReader(stream_store)
    stored = np.concatenate(
        [reader.read_shard(i)["topk_logits"] for i in range(len(reader.shards))]
    )
    stream = CacheStream(reader, batch_size=5, shuffle=False, buffer_size=0)  # batches span shards
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a read-only numpy array
        for _ in range(2):  # the second epoch reads what the first one's mutations left
            rows = 0
            for b in stream:
                ids = b["sample_id"].numpy()
                # Every batch holds the stored values, whatever earlier batches had done.
                np.testing.assert_array_equal(b["topk_logits"].numpy(), stored[ids])
                b["topk_logits"].mul_(2)  # in place: must not touch the reader's Arrow buffers
                np.testing.assert_array_equal(b["topk_logits"].numpy(), 2 * stored[ids])
                rows += len(ids)
            assert rows == N


def test_features_off_and_dense_columns(stream_store, tmp_path):
    assert "features" not in next(iter(CacheStream(stream_store, features=False)))
    toy_precompute(tmp_path / "dense", codec="dense", data_args={"n": 20})
    batch = next(iter(CacheStream(str(tmp_path / "dense"), batch_size=32)))
    assert set(batch) == {"sample_id", "view", "label", "logits"} and batch["logits"].shape == (
        20,
        10,
    )


def test_shuffle_buffer_pulls_pieces_lazily_and_loses_nothing():
    pulled = []

    def pieces():
        for i in range(20):
            pulled.append(i)
            yield {"sample_id": np.arange(i * 10, i * 10 + 10)}

    rng = np.random.default_rng(0)
    gen = shuffle_buffer(pieces(), [8] * 25, buffer_size=30, rng=rng, shuffle=True)
    first = next(gen)
    assert len(first["sample_id"]) == 8
    assert len(pulled) == 4  # 30 buffered + 8 for the batch need 4 pieces of 10, no more
    rest = [b["sample_id"] for b in gen]
    np.testing.assert_array_equal(
        np.sort(np.concatenate([first["sample_id"], *rest])), np.arange(200)
    )
    assert sum(len(b) < 8 for b in rest) == 0  # 200 = 25 * 8: no short batch


def test_prefetch_reads_at_most_depth_ahead():
    calls, lock = [], threading.Lock()

    def read(i):
        with lock:
            calls.append(i)
        return i

    fetch = _Prefetcher(read, list(range(50)), depth=3)
    it = iter(fetch)
    assert next(it) == 0
    time.sleep(0.3)  # give the thread every chance to run ahead
    # consumed 1, queue holds 3, and the thread may hold one more it cannot put yet
    assert len(calls) <= 1 + 3 + 1
    assert list(it) == list(range(1, 50))
    fetch.close()


def test_prefetch_hands_reader_errors_to_the_consumer():
    def read(i):
        if i == 2:
            raise OSError("boom")
        return i

    fetch = _Prefetcher(read, [0, 1, 2, 3], depth=2)
    with pytest.raises(OSError, match="boom"):
        list(fetch)
    fetch.close()
