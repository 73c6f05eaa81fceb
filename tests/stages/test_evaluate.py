"""Metrics against direct computations, and `kdcache evaluate` (pipeline.jobs.evaluate) on a toy student."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcache.pipeline.jobs import evaluate as run
from kdcache.pipeline.jobs import train
from kdcache.stages.evaluate.run import EvaluateConfig
from kdcache.stages.tasks.scoring import (
    agreement,
    batch_sums,
    expected_calibration_error,
    summarise,
)
from kdcache.stages.train.run_log import csv_text, parse_csv
from kdcache.stages.train.trainer import TrainConfig
from kdcache.storage.codecs import open_codec
from kdcache.storage.errors import UsageError
from kdcache.storage.reader import CacheReader
from tests.conftest import toy_precompute
from tests.toy_models import ToyData, ToyNet


def test_summed_metrics_equal_direct_ones():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 7, generator=g) * 2
    labels = torch.randint(0, 7, (300,), generator=g)
    labels[::10] = -1  # missing labels are ignored everywhere
    sums = sum(batch_sums(logits[a : a + 64], labels[a : a + 64]) for a in range(0, 300, 64))
    m = summarise(sums)
    keep = labels >= 0
    conf, pred = logits[keep].softmax(-1).max(-1)
    correct = (pred == labels[keep]).numpy()
    assert m["n"] == 270
    assert m["accuracy"] == pytest.approx(correct.mean(), abs=1e-12)
    assert m["loss"] == pytest.approx(float(F.cross_entropy(logits[keep], labels[keep])), rel=1e-6)
    assert m["ece"] == pytest.approx(expected_calibration_error(conf.numpy(), correct), abs=1e-6)
    assert 0 < m["ece"] < 1
    assert summarise(batch_sums(logits[:0], labels[:0]))["accuracy"] is None


def test_ece_by_hand():
    # Bins of width 1/15: 0.95 and 0.99 share the last bin (accuracy 1/2, confidence 0.97);
    # 0.5 sits alone (accuracy 1). ECE = (2 * 0.47 + 1 * 0.5) / 3.
    ece = expected_calibration_error(np.array([0.95, 0.99, 0.5]), np.array([1, 0, 1]))
    assert ece == pytest.approx((2 * 0.47 + 0.5) / 3)
    z = torch.log(torch.tensor([[0.95, 0.05], [0.99, 0.01], [0.5, 0.5]]))
    assert summarise(batch_sums(z, torch.tensor([0, 1, 0])))["ece"] == pytest.approx(ece)


def test_teacher_top1_and_agreement():
    dense = {"logits": np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]], np.float16)}
    topk = {"topk_indices": np.array([[1, 0], [0, 2]], np.int32)}
    settings = {"dtype": "float16", "num_classes": 3, "top_k": 2}
    dense_codec = open_codec({"codec": "dense", **settings})
    topk_codec = open_codec({"codec": "topk", **settings})
    np.testing.assert_array_equal(dense_codec.teacher_top1(dense), [1, 0])
    np.testing.assert_array_equal(topk_codec.teacher_top1(topk), [1, 0])
    assert agreement(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([1, 0])) == 0.5


def test_csv_round_trip():
    rows = [{"epoch": 1, "step": 4, "loss": 0.123456789012, "agreement": None}]
    back = parse_csv(csv_text(rows))
    assert back[0]["epoch"] == 1 and back[0]["agreement"] is None and back[0]["eval_ece"] is None
    assert back[0]["loss"] == pytest.approx(0.123456789012, abs=1e-10)


def test_evaluate_a_trained_student(tmp_path):
    cache = tmp_path / "cache"
    toy_precompute(cache, data_args={"n": 96}, shard_rows=32, top_k=3)
    out = tmp_path / "student"
    cfg = TrainConfig(
        student="tests.toy_models:ToyNet", student_args={"dim": 8}, data="tests.toy_models:ToyData",
        data_args={"n": 96}, cache=str(cache), out=str(out), epochs=1, batch_size=32,
        device="cpu", quiet=True,
    )  # fmt: skip
    train(cfg)
    got = run(
        EvaluateConfig(
            checkpoint=str(out), data="tests.toy_models:ToyData", data_args={"n": 30, "seed": 2},
            cache=str(cache), agree_rows=50, device="cpu",
        )
    )  # fmt: skip
    student = ToyNet(dim=8)
    student.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    student.eval()
    data = ToyData(30, seed=2)
    with torch.no_grad():
        z = student(torch.from_numpy(data.x))
    labels = torch.arange(30) % 10
    assert got["n"] == 30
    assert got["accuracy"] == pytest.approx(float((z.argmax(1) == labels).double().mean()))
    reader = CacheReader(str(cache))
    rows = [reader.read_shard(i) for i in (0, 1)]  # 50 rows span the first two shards
    ids = np.concatenate([r["sample_id"] for r in rows])[:50]
    top1 = np.concatenate([reader.codec.teacher_top1(r) for r in rows])[:50]
    with torch.no_grad():
        zs = student(torch.from_numpy(ToyData(96).x[ids]))
    assert got["agreement"] == pytest.approx(agreement(zs, torch.from_numpy(top1)))
    with pytest.raises(UsageError, match="no labels"):
        run(EvaluateConfig(checkpoint=str(out), data="tests.toy_models:ToyData",
                           data_args={"n": 10, "labels": False}, device="cpu"))  # fmt: skip
