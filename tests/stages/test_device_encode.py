"""Stage one's on-device encoding (stages/precompute/device_encode.py): the writer's queue holds host arrays
only, the chunk size never changes the stored bytes, and its bad inputs get one line."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kdcache.stages.precompute import run as precompute
from kdcache.stages.precompute.device_encode import DeviceStats, ShardEnd, TeacherBatch
from kdcache.storage.errors import UsageError
from tests import toy_models
from tests.conftest import assert_one_line_error, files_under
from tests.stages.test_precompute_lm import lm_args


class NaNLM(toy_models.ToyCausalLM):
    """Finite for the probe and the first batch, then one NaN logit at row 0, position 1."""

    calls = 0

    def forward(self, input_ids):
        z = super().forward(input_ids)
        NaNLM.calls += 1
        if NaNLM.calls >= 3:
            z[0, 1, 5] = float("nan")
        return z


def tensors_in(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value):
        value = [getattr(value, f.name) for f in dataclasses.fields(value)]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for v in value for t in tensors_in(v)]
    return []


@pytest.mark.parametrize("codec", ["sampled", "topk", "dense"])
def test_the_queue_only_ever_holds_host_arrays(tmp_path, cli, monkeypatch, codec):
    queued = []
    put = precompute.WriterThread.put
    monkeypatch.setattr(precompute.WriterThread, "put", lambda w, item: (queued.append(item),
                        put(w, item))[1])  # fmt: skip
    res = cli(
        *lm_args(tmp_path / "s", "--codec", codec, "--features", "body", "--pool", "token-mean")
    )
    assert res.exit_code == 0, res.stderr
    batches = [q for q in queued if isinstance(q, TeacherBatch)]
    assert len(batches) == 9 and sum(isinstance(q, ShardEnd) for q in queued) == 3
    assert all(q is None or isinstance(q, int | TeacherBatch | ShardEnd) for q in queued)
    assert tensors_in(queued) == []
    arrays = [a for b in batches for c in [b.columns, *b.chunks] for a in c.values()]
    assert all(isinstance(a, np.ndarray) for a in arrays)
    assert all(isinstance(b.features, np.ndarray) for b in batches)


@pytest.mark.parametrize(("codec", "extra"), [("sampled", []), ("topk", ["--top-k", "5"])])
def test_the_chunk_size_does_not_change_the_stored_bytes(tmp_path, cli, codec, extra):
    # 4,000 bytes: one token per chunk for sampled at V = 64 (3,968 bytes of work), 7 for topk.
    for name, more in (("whole", []), ("chunked", ["--encode-chunk-bytes", "4000"])):
        res = cli(*lm_args(tmp_path / name, "--codec", codec, *extra, *more))
        assert res.exit_code == 0, res.stderr
    assert files_under(tmp_path / "whole") == files_under(tmp_path / "chunked")


def test_a_chunk_budget_below_one_token_is_one_line(tmp_path, cli):
    res = cli(*lm_args(tmp_path / "s", "--encode-chunk-bytes", "100"))
    assert res.exit_code != 0
    assert_one_line_error(res.stderr, "--encode-chunk-bytes 100", "raise it to at least 3968")


def test_nan_after_the_probe_refuses_the_shard_and_commits_nothing(tmp_path, cli):
    NaNLM.calls = 0
    teacher = "tests.stages.test_device_encode:NaNLM"
    args = lm_args(tmp_path / "s", "--teacher", teacher, "--codec", "topk")
    res = cli(*args)
    assert res.exit_code != 0
    assert_one_line_error(res.stderr, "NaN/Inf outputs for sample_id [3]")
    assert not list((tmp_path / "s").rglob("*.parquet"))


def test_device_stats_are_read_once_and_name_non_finite_rows():
    stats = DeviceStats()
    stats.add({"a": torch.tensor(1.5, dtype=torch.float64), "n": torch.tensor(2)})
    stats.add({"a": torch.tensor(2.0, dtype=torch.float64), "n": torch.tensor(3)})
    stats.bad.append((np.array([7, 8]), torch.tensor([0, 0], dtype=torch.int32)))
    assert stats.read() == {"a": 3.5, "n": 5}
    assert stats.read() == {}  # reset for the next shard
    stats.bad.append((np.array([7, 8]), torch.tensor([0, 2], dtype=torch.int32)))
    with pytest.raises(UsageError, match=r"sample_id \[8\]"):
        stats.read()


class PlacedLM(toy_models.ToyCausalLM):
    """As a Hugging Face model loaded with device_map=...: placed already, never to be moved."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.hf_device_map = {"embed": "cpu", "body": "cpu", "head": "cpu"}

    def to(self, *args, **kwargs):
        raise AssertionError("a placed teacher was moved")


def test_a_teacher_placed_by_its_loader_is_used_as_placed(tmp_path, cli):
    from kdcache.stages.common.device import placed_device

    assert placed_device(toy_models.ToyCausalLM()) is None
    assert placed_device(PlacedLM()) == torch.device("cpu")
    teacher = "tests.stages.test_device_encode:PlacedLM"
    res = cli(*lm_args(tmp_path / "s", "--teacher", teacher, "--codec", "topk"))
    assert res.exit_code == 0, res.stderr


@pytest.mark.parametrize("chunk", [None, "2000"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dense_stores_the_teachers_logits_over_t_in_every_chunk(tmp_path, cli, dtype, chunk):
    """The teacher computed here, token by token, against the store: a float32 cast on the CPU is
    a no-op that must still copy (the chunk workspace is reused), fp16 rounds once."""
    from kdcache.storage.reader import CacheReader
    from tests.stages.test_precompute_lm import teacher_tokens

    more = ["--encode-chunk-bytes", chunk] if chunk else []
    out = tmp_path / "s"
    res = cli(*lm_args(out, "--codec", "dense", "--dtype", dtype, "--temperature", "2", *more))
    assert res.exit_code == 0, res.stderr
    r = CacheReader(str(out))
    want, _ = teacher_tokens(24)
    for i in range(len(r.shards)):
        cols = r.read_shard(i, features=False)
        z = torch.cat([want[j] for j in cols["sample_id"]]) / 2
        got = torch.tensor(cols["logits"]).float()
        tol = 1e-6 if dtype == "float32" else 2e-3  # one item at a time here, batched there
        torch.testing.assert_close(got, z.to(getattr(torch, dtype)).float(), atol=tol, rtol=tol)
