"""Stage one end to end, in-process: stored values against the teacher's own outputs, and failures."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from kdcache.stages.common.hooks import pool
from kdcache.storage.errors import KdcacheError, UsageError
from kdcache.storage.reader import CacheReader
from tests.conftest import files_under, labels_of, teacher_outputs, toy_precompute

N = 50


def read_all(url) -> dict[str, np.ndarray]:
    r = CacheReader(str(url))
    parts = [r.read_shard(i) for i in range(len(r.shards))]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-6), ("float16", 1e-3)])
def test_topk_round_trip_matches_torch(tmp_path, dtype, tol):
    T, k = 2.5, 4
    toy_precompute(
        tmp_path / "s", temperature=T, top_k=k, dtype=dtype, data_args={"n": N, "every_missing": 3}
    )
    z, _, _ = teacher_outputs(N)
    s = z / T
    want_vals, want_idx = torch.topk(s, k, dim=1)
    got = read_all(tmp_path / "s")
    assert got["topk_logits"].dtype == np.dtype(dtype) and got["logsumexp"].dtype == np.float32
    np.testing.assert_array_equal(got["sample_id"], np.arange(N))
    np.testing.assert_array_equal(got["label"], labels_of(N, every_missing=3))
    np.testing.assert_array_equal(got["topk_indices"], want_idx.numpy())
    np.testing.assert_allclose(got["topk_logits"].astype(np.float32), want_vals, rtol=tol, atol=tol)
    np.testing.assert_allclose(got["logsumexp"], torch.logsumexp(s, 1), rtol=1e-6)


def test_unlabeled_rows_are_null_in_parquet(tmp_path):
    toy_precompute(tmp_path / "s", data_args={"n": N, "every_missing": 3})
    r = CacheReader(str(tmp_path / "s"))
    label = r.shard_table(0).column("label")
    assert label.null_count == len([i for i in range(r.shards[0]["rows"]) if i % 3 == 0])
    assert label.to_pylist()[:4] == [None, 1, 2, None]
    assert r.manifest["stats"]["labeled_rows"] == N - len(range(0, N, 3))


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-6), ("float16", 1e-3)])
def test_dense_logits_equal_z_over_t(tmp_path, dtype, tol):
    toy_precompute(tmp_path / "s", codec="dense", temperature=3.0, dtype=dtype)
    z, _, _ = teacher_outputs(N)
    got = read_all(tmp_path / "s")
    assert set(got) == {"sample_id", "view", "label", "logits"}
    np.testing.assert_allclose(got["logits"].astype(np.float32), z / 3.0, rtol=tol, atol=tol)
    np.testing.assert_array_equal(got["label"], np.arange(N) % 10)


def test_temperature_recorded_and_retempering_math(tmp_path):
    T, T2 = 4.0, 1.5
    toy_precompute(tmp_path / "d", codec="dense", temperature=T, dtype="float32")
    toy_precompute(tmp_path / "k", temperature=T, top_k=3, dtype="float32")
    z, _, _ = teacher_outputs(N)
    dense, topk = CacheReader(str(tmp_path / "d")), CacheReader(str(tmp_path / "k"))
    assert dense.temperature == topk.temperature == T == topk.manifest["temperature"]
    s = read_all(tmp_path / "d")["logits"]
    np.testing.assert_allclose(s * T / T2, z / T2, rtol=1e-5, atol=1e-6)
    # top-k: p_i = exp(s_i - lse) are the teacher's exact probabilities at T, residual = 1 - sum
    got = read_all(tmp_path / "k")
    p = torch.softmax(z / T, 1).numpy()
    p_k = np.exp(got["topk_logits"] - got["logsumexp"][:, None])
    np.testing.assert_allclose(p_k, np.take_along_axis(p, got["topk_indices"], 1), rtol=1e-5)
    # The residual is the mass of the classes not stored, from the teacher's own softmax, and
    # FORMAT.md's formula -expm1(logsumexp(s_topk) - lse) gives it from the stored values.
    unstored = np.ones_like(p, bool)
    np.put_along_axis(unstored, got["topk_indices"], False, 1)
    residual = np.where(unstored, p, 0).sum(1)
    assert residual.min() > 0.05  # k = 3 of 10 at T = 4 leaves real mass out
    lse_k = torch.logsumexp(torch.from_numpy(got["topk_logits"]), 1).numpy()
    np.testing.assert_allclose(-np.expm1(lse_k - got["logsumexp"]), residual, rtol=1e-5)
    np.testing.assert_allclose(1 - p_k.sum(1), residual, rtol=1e-5)
    np.testing.assert_allclose(
        got["topk_logits"] * T / T2, np.take_along_axis(z / T2, got["topk_indices"], 1), rtol=1e-5
    )
    stats = topk.manifest["stats"]
    assert stats["mean_residual_mass"] == pytest.approx(float(residual.mean()), rel=1e-5)


@pytest.mark.parametrize("mode", ["avg", "token-mean", "cls", "flatten"])
def test_features_are_the_pooled_teacher_activations(tmp_path, mode):
    toy_precompute(tmp_path / "s", features="body", pool=mode, feature_dtype="float32")
    _, act, _ = teacher_outputs(N)
    want = pool(act, mode).reshape(N, -1).numpy()
    r = CacheReader(str(tmp_path / "s"))
    assert r.features_info["dim"] == want.shape[1] and r.features_info["pool"] == mode
    got = read_all(tmp_path / "s")["features"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(r.read_features(10, 20), got[10:20])


def test_feature_compression_is_a_zarr_codec_with_the_same_values(tmp_path):
    import zarr

    toy_precompute(tmp_path / "raw", features="body")
    toy_precompute(tmp_path / "zstd", features="body", feature_compression="zstd")
    raw, packed = (zarr.open_array(str(tmp_path / n / "features.zarr")) for n in ("raw", "zstd"))
    assert raw.compressors == () and type(packed.compressors[0]).__name__ == "ZstdCodec"
    np.testing.assert_array_equal(raw[:], packed[:])
    fingerprints = {CacheReader(str(tmp_path / n)).fingerprint for n in ("raw", "zstd")}
    assert len(fingerprints) == 2  # other bytes, another cache
    with pytest.raises(UsageError, match="--feature-compression 'lz4'"):
        toy_precompute(tmp_path / "bad", features="body", feature_compression="lz4")


def test_float16_features(tmp_path):
    toy_precompute(tmp_path / "s", features="body.proj")
    _, _, x = teacher_outputs(N)
    from tests.toy_models import ToyNet

    want = ToyNet().body.proj(x).detach().numpy()
    got = read_all(tmp_path / "s")["features"]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("out", ["dict", "tuple", "object"])
def test_teacher_output_wrappers_store_the_same_logits(tmp_path, out):
    toy_precompute(tmp_path / "plain")
    toy_precompute(tmp_path / out, teacher_args={"out": out})
    assert files_under(tmp_path / out) == files_under(tmp_path / "plain")


@pytest.mark.parametrize("data", ["tests.toy_models:ToyDictData", "tests.toy_models:ToyBatchData"])
def test_data_item_styles_store_the_same_rows(tmp_path, data):
    toy_precompute(tmp_path / "plain")
    toy_precompute(tmp_path / "other", data=data)
    assert files_under(tmp_path / "other") == files_under(tmp_path / "plain")
    a, b = CacheReader(str(tmp_path / "plain")), CacheReader(str(tmp_path / "other"))
    assert a.data_fingerprint == b.data_fingerprint  # content, not spec
    assert a.fingerprint != b.fingerprint  # the spec is part of the store's identity


def test_num_workers_do_not_change_bytes(tmp_path):
    toy_precompute(tmp_path / "a", features="body")
    toy_precompute(tmp_path / "b", features="body", num_workers=2)
    assert files_under(tmp_path / "b") == files_under(tmp_path / "a")


def test_batch_size_is_not_part_of_the_identity(tmp_path):
    # Another batch size may change the last float bit (BLAS blocking), never the values.
    toy_precompute(tmp_path / "a", features="body", dtype="float32", feature_dtype="float32")
    toy_precompute(
        tmp_path / "b", features="body", dtype="float32", feature_dtype="float32", batch_size=5
    )
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    assert (
        CacheReader(str(tmp_path / "a")).fingerprint == CacheReader(str(tmp_path / "b")).fingerprint
    )
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5)


def test_cache_hit_runs_no_forward(tmp_path):
    count = tmp_path / "forwards.txt"
    first = toy_precompute(tmp_path / "s", teacher_args={"count_file": str(count)})
    assert first["status"] == "done"
    calls = count.read_text().count("\n")
    assert calls == 1 + 2 * 4  # probe + 2 batches for each of 4 shards (13, 13, 13, 11 rows)
    second = toy_precompute(tmp_path / "s", teacher_args={"count_file": str(count)}, batch_size=3)
    assert second["status"] == "hit"
    assert count.read_text().count("\n") == calls


@pytest.mark.parametrize("outputs", [3, 1])
def test_regression_stores_raw_outputs_dense(tmp_path, outputs):
    from tests.toy_models import RegNet, toy_inputs

    toy_precompute(
        tmp_path / "s",
        teacher="tests.toy_models:RegNet",
        teacher_args={"outputs": outputs},
        task="regression",
        temperature=7.0,
        dtype="float32",
        data_args={"n": N, "labels": False},  # no targets: teacher outputs only
    )
    r = CacheReader(str(tmp_path / "s"))
    assert r.targets_info == {"dtype": "float32", "width": outputs} and r.target_rows == 0
    assert (r.task, r.codec.name, r.temperature, r.num_classes) == (
        "regression",
        "dense",
        1.0,
        outputs,
    )
    with torch.no_grad():
        want = RegNet(outputs).eval()(torch.from_numpy(toy_inputs(N))).reshape(N, outputs)
    np.testing.assert_allclose(read_all(tmp_path / "s")["logits"], want, rtol=1e-6, atol=1e-7)
    assert "teacher_accuracy" not in r.manifest["stats"]


def test_regression_refuses_topk(tmp_path):
    with pytest.raises(UsageError, match="--codec dense"):
        toy_precompute(tmp_path / "s", task="regression", codec="topk")


BAD = [
    ({"temperature": 0.0}, "--temperature 0.0"),
    ({"temperature": -1.0}, "--temperature -1.0"),
    ({"temperature": float("inf")}, "--temperature inf: must be a finite number"),
    ({"top_k": 0}, "--top-k 0"),
    ({"top_k": 11}, "--top-k 11 exceeds the teacher's 10 classes"),
    ({"pool": "max"}, "--pool 'max'"),
    ({"features": "bdy"}, "--features 'bdy' is not a submodule of ToyNet; did you mean body"),
    ({"features": "spare"}, "--features 'spare' did not run during the teacher's forward"),
    ({"teacher": "tests.toy_models.ToyNet"}, "not of the form package.module:attr"),
    ({"teacher": "tests.no_such_module:ToyNet"}, "cannot import 'tests.no_such_module'"),
    ({"teacher": "tests.toy_models:Nope"}, "has no attribute 'Nope'"),
    ({"teacher": "tests.toy_models:NotAModule"}, "not a torch.nn.Module"),
    ({"teacher_args": {"bogus": 1}}, "rejected its arguments"),
    ({"teacher": "tests.toy_models:WrongShapeNet"}, "shape (2, 10, 2) for a batch of 2"),
    ({"teacher": "tests.toy_models:NaNNet"}, "NaN/Inf outputs for sample_id [0, 1]"),
    ({"teacher": "tests.toy_models:NaNNet", "teacher_args": {"inf": True}}, "NaN/Inf"),
    ({"data": "tests.toy_models:EmptyData", "data_args": {}}, "is empty"),
    ({"data": "tests.toy_models:BadLabelData", "data_args": {}}, "label 99 of sample_id 30"),
    ({"task": "ranking"}, "--task 'ranking'"),
    ({"shard_rows": 0}, "--shard-rows 0 must be >= 1"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[m[:24] for _, m in BAD])
def test_bad_inputs_raise_usage_error_and_write_no_manifest(tmp_path, overrides, message):
    with pytest.raises(UsageError) as info:
        toy_precompute(tmp_path / "s", **overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "s" / "manifest.json").exists()
    assert not (tmp_path / "s" / "_lock.json").exists()


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kdcache-writer" and t.is_alive()]


def test_mid_run_failure_keeps_committed_shards_and_stops_the_writer(tmp_path):
    before = len(_writer_threads())
    with pytest.raises(UsageError, match="sample_id 30"):
        toy_precompute(tmp_path / "s", data="tests.toy_models:BadLabelData", data_args={})
    assert not (tmp_path / "s" / "manifest.json").exists()
    # Shards of 13 rows: the two before sample 30's are whole and committed, the third is not.
    committed = sorted(p.name for p in (tmp_path / "s" / "_commits").iterdir())
    assert committed == ["part-00000.json", "part-00001.json"]
    for t in _writer_threads()[before:]:
        t.join(timeout=5)
    assert len(_writer_threads()) == before
    with pytest.raises(KdcacheError, match="incomplete kdcache store"):
        CacheReader(str(tmp_path / "s"))


def test_nan_after_the_probe_is_caught_mid_run(tmp_path):
    # The probe sees rows 0 and 1 (finite); the NaN rows come later, while shards are written.
    _, _, x = teacher_outputs(N)
    threshold = float(x[:2, 0].max())
    bad = (x[:, 0] > threshold).nonzero().flatten()[:5].tolist()
    with pytest.raises(UsageError, match=r"NaN/Inf outputs for sample_id \[" + str(bad[0])):
        toy_precompute(
            tmp_path / "s", teacher="tests.toy_models:NaNNet", teacher_args={"threshold": threshold}
        )
    assert (tmp_path / "s" / "_run.json").exists() and not (
        tmp_path / "s" / "manifest.json"
    ).exists()


def test_writer_thread_error_reaches_the_caller(tmp_path):
    # The teacher's first forward turns the store's soft_labels folder into a file, so the
    # writer thread's first Parquet write fails; the run must fail with that error, not hang.
    out = tmp_path / "s"
    with pytest.raises(OSError):
        toy_precompute(out, teacher_args={"sabotage": str(out / "soft_labels")})
    assert not (out / "manifest.json").exists()
    assert not (out / "_commits").exists()


def test_manifest_stats_recomputed_from_the_teachers_outputs(tmp_path):
    """mean_topk_kl, mean_residual_mass and teacher_accuracy as docs/FORMAT.md defines them,
    computed here from ToyNet's own logits (float64), not from anything the store holds."""
    T, k, n = 2.0, 3, 120
    toy_precompute(tmp_path / "s", temperature=T, top_k=k, data_args={"n": n, "every_missing": 3})
    stats = CacheReader(str(tmp_path / "s")).manifest["stats"]
    z = teacher_outputs(n)[0].double()
    p = torch.softmax(z / T, 1).numpy()
    C = p.shape[1]
    unstored = np.ones_like(p, bool)
    np.put_along_axis(unstored, torch.topk(z, k, 1).indices.numpy(), False, 1)
    r = np.where(unstored, p, 0).sum(1)
    # KL(p || p_hat), p_hat: the k exact probabilities and r spread evenly over the C - k others.
    kl = np.where(unstored, p * np.log(p), 0).sum(1) - r * np.log(r / (C - k))
    labels = labels_of(n, every_missing=3)
    labeled = labels >= 0
    accuracy = float((z.argmax(1).numpy() == labels)[labeled].mean())
    assert 0 < accuracy < 1 and kl.min() > 0  # values that a wrong formula would miss
    assert stats["labeled_rows"] == int(labeled.sum())
    assert stats["teacher_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert stats["mean_residual_mass"] == pytest.approx(float(r.mean()), rel=1e-5)
    assert stats["mean_topk_kl"] == pytest.approx(float(kl.mean()), rel=1e-4)
