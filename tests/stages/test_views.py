"""Views of augmented inputs: stored per (sample_id, view), replayed bit for bit in stage two."""

from __future__ import annotations

import hashlib
import subprocess

import numpy as np
import pytest
import torch

from kdcache.pipeline import jobs
from kdcache.pipeline.models import load_model
from kdcache.pipeline.runtime import Dist
from kdcache.pipeline.specs import augmentation
from kdcache.stages.precompute import run as precompute
from kdcache.stages.train import streams
from kdcache.storage.errors import UsageError
from kdcache.storage.reader import CacheReader
from kdcache.storage.views import chosen_views
from tests.conftest import (
    REPO,
    assert_one_line_error,
    cli_args,
    files_under,
    kdcache_cmd,
    kill_9_after_commits,
    toy_config,
    toy_precompute,
)
from tests.stages.test_train import config
from tests.toy_models import ToyData

SHIFT = "kdcache.pipeline.examples.augment:signal_1d"
N, V = 40, 3


def global_rng_noise(x, generator):
    """A broken augmentation: its noise comes from the global RNG, not the generator."""
    return x + 0.1 * torch.randn(x.shape)


def recorded_store(out, **overrides):
    """Precompute a store of views in-process, recording every input the teacher saw."""
    cfg = toy_config(out, views=V, augment=SHIFT, data_args={"n": N}, **overrides)
    cfg.validate()
    model, identity = load_model(cfg.teacher, cfg.teacher_args)
    seen = []
    model.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    augment = augmentation(cfg.augment, cfg.augment_args)
    ds = ToyData(N)
    precompute.run(cfg, model, identity, ds, Dist(), torch.device("cpu"), augment=augment)
    return torch.cat(seen[1:])  # the first forward is the two-row probe


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("views") / "store"
    inputs = recorded_store(out, features="body", top_k=3)
    return str(out), inputs


def test_rows_are_keyed_views_with_the_hash_of_the_teachers_input(store):
    url, inputs = store
    r = CacheReader(url)
    assert r.num_rows == N * V and r.views["count"] == V and r.verify() == []
    ids, view = r.keys()
    # Row i * V + v holds (i, v): a sample's views are consecutive (docs/FORMAT.md).
    assert np.array_equal(ids, np.repeat(np.arange(N), V))
    assert np.array_equal(view, np.tile(np.arange(V), N))
    stored = np.concatenate([r.read_shard(i)["input_hash"] for i in range(len(r.shards))])
    # Store rows are in the order the teacher ran them: the hash column is of its inputs, by
    # FORMAT.md's recipe computed here (blake2b-64 of "dtype|shape|" and the bytes).
    want = [
        int.from_bytes(
            hashlib.blake2b(
                f"{x.dtype}|{tuple(x.shape)}|".encode() + x.numpy().tobytes(), digest_size=8
            ).digest(),
            "little",
        )
        for x in inputs
    ]
    assert stored.tolist() == want
    # The views of a sample differ (the augmentation did something) and are not the raw input.
    raw = torch.from_numpy(ToyData(N).x)
    assert not torch.equal(inputs[0], inputs[1])
    assert not torch.equal(inputs[0], raw[0])


def test_every_stored_row_is_replayed_bitwise_once_per_v_epochs(store):
    url, inputs = store
    r = CacheReader(url)
    ids, view = r.keys()
    teacher_input = {
        (int(i), int(v)): inputs[j] for j, (i, v) in enumerate(zip(ids, view, strict=True))
    }
    augment = augmentation(SHIFT, {})
    seen = []
    for epoch in range(1, V + 1):
        stream = streams.ViewStream(r, ToyData(N), 7, augment=augment, seed=3, buffer_size=5)
        stream.set_epoch(epoch)
        epoch_ids = []
        for batch in stream:
            keys = zip(batch["sample_id"].tolist(), batch["view"].tolist(), strict=True)
            for j, (i, v) in enumerate(keys):
                assert torch.equal(batch["input"][j], teacher_input[(i, v)])  # bitwise
                seen.append((i, v))
            epoch_ids += batch["sample_id"].tolist()
            assert batch["features"].shape == (len(batch["sample_id"]), 16)
        assert sorted(epoch_ids) == list(range(N))  # every sample once per epoch
    assert sorted(seen) == sorted(teacher_input)  # every view once per V epochs


@pytest.mark.parametrize(("world", "workers"), [(1, 2), (2, 1), (2, 2)])
def test_ranks_and_workers_see_each_sample_once_per_epoch(store, world, workers):
    url, _ = store
    r = CacheReader(url)
    augment = augmentation(SHIFT, {})
    for epoch in (1, 2):
        got = []
        for rank in range(world):
            stream = streams.ViewStream(
                r,
                ToyData(N),
                4,
                augment=augment,
                buffer_size=8,
                rank=rank,
                world_size=world,
                num_workers=workers,
            )
            stream.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
            batches = list(loader)
            assert len(batches) == stream.num_batches()
            for b in batches:
                want = chosen_views(0, epoch, b["sample_id"].numpy(), V)
                assert np.array_equal(b["view"].numpy(), want)
                got += b["sample_id"].tolist()
        assert sorted(got) == list(range(N))


def test_chosen_views_use_every_view_once_per_cycle():
    ids = np.arange(500)
    for cycle in range(3):
        picks = np.stack([chosen_views(7, e, ids, 8) for e in range(cycle * 8 + 1, cycle * 8 + 9)])
        assert (np.sort(picks, axis=0) == np.arange(8)[:, None]).all()
    first = chosen_views(7, 1, ids, 8)
    assert len(set(first.tolist())) == 8  # samples start on different views
    assert not np.array_equal(first, chosen_views(8, 1, ids, 8))  # the seed matters
    assert not np.array_equal(first, chosen_views(7, 9, ids, 8))  # so does the cycle


def test_a_store_without_augment_is_byte_identical_to_before_views(tmp_path):
    """The fixture was written by the code before views existed (tests/fixtures/README.md)."""
    fixture = REPO / "tests" / "fixtures" / "kdcache2-topk"
    out = tmp_path / "s"
    m = toy_precompute(
        out,
        data_args={"n": 10, "num_classes": 5, "every_missing": 4},
        teacher_args={"num_classes": 5, "dim": 4},
        shard_rows=8,
        features="body",
        top_k=3,
    )["manifest"]
    assert "views" not in m and m["fingerprint"] == CacheReader(str(fixture)).fingerprint
    assert files_under(out) == files_under(fixture)
    assert (out / "_run.json").read_bytes() == (fixture / "_run.json").read_bytes()


def test_views_settings_are_in_the_fingerprint(tmp_path):
    base = dict(views=2, augment=SHIFT, data_args={"n": 12})
    out = tmp_path / "s"
    first = toy_precompute(out, **base)["manifest"]["fingerprint"]
    assert toy_precompute(out, **base)["status"] == "hit"
    for change in ({"views": 3}, {"seed": 1}, {"augment_args": {"max_shift": 1}}):
        with pytest.raises(UsageError, match="views"):
            toy_precompute(out, **{**base, **change})
        other = toy_precompute(tmp_path / str(change), **{**base, **change})["manifest"]
        assert other["fingerprint"] != first


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"views": 2}, "--views 2 needs --augment"),
        ({"augment_args": {"max_shift": 1}}, "--augment-arg needs --augment"),
        ({"augment": "tests.stages.test_views:nowhere"}, "has no attribute"),
    ],
)
def test_bad_view_options_are_refused(tmp_path, overrides, message):
    with pytest.raises(UsageError, match=message):
        toy_precompute(tmp_path / "s", **overrides)
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_a_non_deterministic_augmentation_is_caught_in_one_line(tmp_path, kdcache_proc):
    store = tmp_path / "s"
    bad = "tests.stages.test_views:global_rng_noise"
    made = kdcache_proc(*cli_args(store, "--views", "2", "--augment", bad, n=20))
    assert made.returncode == 0, made.stderr
    args = ["train", "--cache", store, "--student", "tests.toy_models:ToyNet"]
    args += ["--data", "tests.toy_models:ToyData", "--data-arg", "n=20", "--epochs", "1"]
    args += ["--out", tmp_path / "student", "--device", "cpu", "--quiet"]
    res = kdcache_proc(*args)
    assert res.returncode == 2
    assert_one_line_error(res.stderr, bad, "not deterministic", "sample_id", "view")
    # --no-check-inputs trains anyway (the user's call), on the inputs it re-created.
    res = kdcache_proc(*args, "--no-check-inputs")
    assert res.returncode == 0, res.stderr


def test_train_takes_the_caches_augmentation_and_refuses_another(store, tmp_path):
    url, _ = store
    common = dict(data_args={"n": N}, epochs=1, batch_size=8)
    t = jobs.trainer(config(tmp_path / "a", url, **common), Dist())
    with t:
        assert t.settings["augment"] == SHIFT and callable(t.augment)
        assert t.run()["status"] == "done"
    for augment, args in (
        (SHIFT, {"max_shift": 1}),
        ("tests.stages.test_views:global_rng_noise", {}),
    ):
        cfg = config(tmp_path / "b", url, augment=augment, augment_args=args, **common)
        with pytest.raises(UsageError, match="is not the augmentation of the views"):
            jobs.trainer(cfg, Dist())


def epoch_inputs(stream, epoch: int) -> dict:
    stream.set_epoch(epoch)
    return {i: x for b in stream for i, x in zip(b["sample_id"].tolist(), b["input"], strict=True)}


def test_augment_without_views_is_applied_on_the_fly(tmp_path):
    """The naive pairing: a plain cache, a fresh view every epoch, the same one after a resume."""
    cache = tmp_path / "plain"
    toy_precompute(cache, data_args={"n": N})
    for cache_url in (str(cache), None):  # from a cache, and hard labels alone
        cfg = config(
            tmp_path / f"s{cache_url is None}", cache_url, augment=SHIFT, data_args={"n": N}
        )
        t = jobs.trainer(cfg, Dist())
        with t:
            t.setup()
            raw = torch.from_numpy(ToyData(N).x)
            one, again, two = (epoch_inputs(t.stream, e) for e in (1, 1, 2))
            assert one.keys() == two.keys() and len(one) > 0
            assert all(torch.equal(one[i], again[i]) for i in one)
            assert not any(torch.equal(one[i], raw[i]) for i in one)
            assert not any(torch.equal(one[i], two[i]) for i in one)


def test_kill_9_mid_views_then_rerun_is_byte_identical(tmp_path):
    views_args = ("--views", "4", "--augment", SHIFT, "--features", "body")
    out = tmp_path / "s"
    args = cli_args(out, "--teacher-arg", "sleep=0.05", *views_args, n=40)
    kill_9_after_commits(args, out)
    again = subprocess.run(kdcache_cmd(*args), cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    ref = tmp_path / "ref"
    done = subprocess.run(kdcache_cmd(*cli_args(ref, *views_args, n=40)), cwd=REPO)
    assert done.returncode == 0
    assert files_under(out) == files_under(ref) and len(files_under(ref)) > 3


@pytest.mark.parametrize("replayed", [True, False])
def test_a_resumed_student_sees_the_same_views(store, tmp_path, replayed):
    """Stopped after epoch 2 and resumed: the same loss curve as a run straight through, with
    replayed views (the epoch picks the view) and on the fly (the epoch seeds it)."""
    url, _ = store
    if not replayed:
        url = str(tmp_path / "plain")
        toy_precompute(url, data_args={"n": N})
    extra = {} if replayed else {"augment": SHIFT}
    common = dict(data_args={"n": N}, epochs=4, batch_size=8, **extra)
    straight = jobs.train(config(tmp_path / "a", url, **common))["rows"]
    assert jobs.train(config(tmp_path / "b", url, **common), stop_after_epoch=2)["status"] == (
        "stopped"
    )
    resumed = jobs.train(config(tmp_path / "b", url, **common))["rows"]
    for a, b in zip(straight, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["epoch"]


def test_loader_workers_write_the_same_views(tmp_path):
    common = dict(views=2, augment=SHIFT, data_args={"n": 30})
    toy_precompute(tmp_path / "w0", **common)
    toy_precompute(tmp_path / "w2", num_workers=2, **common)
    assert files_under(tmp_path / "w2") == files_under(tmp_path / "w0")


@pytest.mark.parametrize(("n", "views", "requested"), [(40, 3, 16), (40, 3, 100), (7, 4, 5)])
def test_whole_samples_per_shard_by_formats_rule(tmp_path, n, views, requested):
    """FORMAT.md: shard_rows = V * balanced(N, floor(R / V)), balanced(N, r) = ceil(N / S) with
    S = ceil(N / r) (computed here); every sample's V views lie in one shard."""
    r = max(1, requested // views)
    shards = -(-n // r)
    want = views * -(-n // shards)
    out = tmp_path / "s"
    toy_precompute(out, views=views, augment=SHIFT, data_args={"n": n}, shard_rows=requested)
    reader = CacheReader(str(out))
    assert reader.manifest["shard_rows"] == want and reader.num_rows == n * views
    for i in range(len(reader.shards)):
        ids = reader.read_shard(i, features=False)["sample_id"]
        assert all(c == views for c in np.unique(ids, return_counts=True)[1]), i


def test_views_of_token_blocks_are_refused(tmp_path):
    with pytest.raises(UsageError, match="views of token blocks are not supported"):
        toy_precompute(
            tmp_path / "s", task="causal-lm", teacher="tests.toy_models:ToyCausalLM",
            data="tests.toy_models:ToyTokens", codec="sampled", views=2, augment=SHIFT,
        )  # fmt: skip
    assert not (tmp_path / "s").exists()
