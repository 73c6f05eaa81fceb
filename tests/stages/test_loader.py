"""Stage two's loader: stored columns joined with their inputs, the data check, labels alone."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from kdcache.stages.common.data import data_fingerprint
from kdcache.stages.train.streams import JoinedStream, LabelStream
from kdcache.storage.errors import UsageError
from kdcache.storage.reader import CacheReader
from tests.conftest import STREAM_ROWS as N
from tests.toy_models import ToyData, toy_inputs


def test_batches_join_inputs_and_carry_stored_columns(stream_store):
    reader = CacheReader(stream_store)
    stored = [reader.read_shard(i) for i in range(len(reader.shards))]
    stored = {k: np.concatenate([s[k] for s in stored]) for k in stored[0]}
    x_all = toy_inputs(N)
    stream = JoinedStream(
        stream_store, ToyData(N, every_missing=7), batch_size=16, buffer_size=8, seed=5
    )
    seen = 0
    for b in stream:
        ids = b["sample_id"].numpy()
        assert b["sample_id"].dtype == torch.int64 and b["label"].dtype == torch.int64
        assert b["features"].dtype == torch.float16  # never widened
        np.testing.assert_array_equal(b["input"].numpy(), x_all[ids])
        np.testing.assert_array_equal(b["label"].numpy(), stored["label"][ids])
        assert (b["label"].numpy()[ids % 7 == 0] == -1).all()
        for key in ("topk_indices", "topk_logits", "logsumexp", "features"):
            np.testing.assert_array_equal(b[key].numpy(), stored[key][ids])
        seen += len(ids)
    assert seen == N


def test_other_data_is_refused_with_both_fingerprints(stream_store, caplog):
    reader = CacheReader(stream_store)
    with pytest.raises(UsageError) as err:
        JoinedStream(stream_store, ToyData(N, seed=1))
    msg = str(err.value)
    assert reader.data_fingerprint in msg and "--ignore-fingerprint" in msg and "\n" not in msg
    assert data_fingerprint(ToyData(N, seed=1)) in msg
    with caplog.at_level(logging.WARNING, logger="kdcache"):
        stream = JoinedStream(stream_store, ToyData(N, seed=1), ignore_fingerprint=True)
    assert "--ignore-fingerprint" in caplog.text
    assert len(next(iter(stream))["input"]) > 0
    with pytest.raises(UsageError, match="has 50 samples"):
        JoinedStream(stream_store, ToyData(50), ignore_fingerprint=True)


@pytest.mark.parametrize(("workers", "ranks"), [(0, 1), (2, 2)])
def test_label_stream_covers_labeled_rows_exactly_once(workers, ranks):
    data = ToyData(N, every_missing=4)
    got = []
    for rank in range(ranks):
        stream = LabelStream(data, 16, seed=1, rank=rank, world_size=ranks, num_workers=workers)
        batches = list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers))
        assert len(batches) == len(stream)
        for b in batches:
            assert (b["label"] >= 0).all()
            np.testing.assert_array_equal(b["input"].numpy(), toy_inputs(N)[b["sample_id"]])
        got += [b["sample_id"].numpy() for b in batches]
    want = np.array([i for i in range(N) if i % 4], dtype=np.int64)
    np.testing.assert_array_equal(np.sort(np.concatenate(got)), want)
    with pytest.raises(UsageError, match="no labeled rows"):
        LabelStream(ToyData(10, labels=False))
