"""Stage one for a causal LM through the CLI: per-token soft labels at real tokens only."""

from __future__ import annotations

import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kdcache.storage.codecs.sampled import Sampled
from kdcache.storage.reader import CacheReader
from tests import toy_models
from tests.conftest import (
    REPO,
    THREADS,
    assert_one_line_error,
    files_under,
    kdcache_cmd,
    kill_9_after_commits,
)

TEACHER = "tests.toy_models:ToyCausalLM"
DATA = "tests.toy_models:ToyTokens"


def lm_args(out, *extra: str, n: int = 24) -> list[str]:
    return [
        "precompute", "--task", "causal-lm", "--teacher", TEACHER, "--data", DATA,
        "--data-arg", f"n={n}", "--out", str(out), "--shard-rows", "8", "--batch-size", "3",
        "--device", "cpu", *THREADS, "--quiet", *extra,
    ]  # fmt: skip


def teacher_tokens(n: int = 24, masked: bool = False) -> tuple[list[torch.Tensor], list]:
    """The teacher's logits at each item's real tokens, computed here, one item at a time."""
    model = toy_models.ToyCausalLM().eval()
    data = toy_models.ToyTokens(n, masked=masked)
    out, ids = [], []
    with torch.no_grad():
        for i in range(n):
            item = data[i]
            x, m = (item["input_ids"], item["attention_mask"]) if masked else (item, None)
            z = model(x[None])[0]
            out.append(z if m is None else z[m.bool()])
            ids.append(x)
    return out, ids


def read_all(url) -> dict:
    r = CacheReader(str(url))
    cols = [r.read_shard(i) for i in range(len(r.shards))]
    return {k: np.concatenate([c[k] for c in cols]) for k in cols[0]}


@pytest.mark.parametrize("masked", [False, True])
def test_topk_per_token_matches_the_teacher_and_stores_no_padding(tmp_path, cli, masked):
    args = lm_args(tmp_path / "s", "--codec", "topk", "--top-k", "5", "--dtype", "float32")
    if masked:
        args += ["--data-arg", "masked=true"]
    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    r = CacheReader(str(tmp_path / "s"))
    z, _ = teacher_tokens(masked=masked)
    got = read_all(tmp_path / "s")
    np.testing.assert_array_equal(got["length"], [len(t) for t in z])
    zt = torch.cat(z)  # T = 1 by default for causal-lm
    assert r.temperature == 1.0 and r.task == "causal-lm" and r.num_classes == 64
    want = torch.topk(zt, 5, dim=1)
    np.testing.assert_array_equal(got["topk_indices"], want.indices)
    np.testing.assert_allclose(got["topk_logits"], want.values, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["logsumexp"], torch.logsumexp(zt, 1), rtol=1e-5)
    stats = r.manifest["stats"]
    assert stats["tokens"] == len(zt)
    # payload per token: ids uint8 + float32 per k, a float32 lse, + the row keys spread over it
    keys = (8 + 4 + 8 + 4) * len(z)
    assert stats["bytes_per_token"] == pytest.approx((len(zt) * (5 * 5 + 4) + keys) / len(zt))
    assert all("bytes_per_token" in s["means"] for s in r.shards)
    assert stats["mean_topk_kl"] > 0 and r.verify() == []


def test_sampled_is_the_default_codec_and_inspect_shows_its_error(tmp_path, cli):
    assert cli(*lm_args(tmp_path / "s")).exit_code == 0
    r = CacheReader(str(tmp_path / "s"))
    assert r.codec.name == "sampled" and r.codec.n == 50
    got = read_all(tmp_path / "s")
    assert int(got["sampled_counts"].sum()) == 50 * r.manifest["stats"]["tokens"]
    res = cli("inspect", tmp_path / "s")
    table = dict(line.split(None, 1) for line in res.stdout.strip().splitlines())
    assert 0 < float(table["mean_tv"]) < 1 and float(table["mean_unique"]) > 1
    assert float(table["bytes_per_token"]) > 0


def test_budget_chooses_k_and_n_and_says_so(tmp_path, cli):
    def said(*args: str):  # without --quiet: the choice is an info line on stderr
        return cli(*[a for a in lm_args(*args) if a != "--quiet"])

    res = said(tmp_path / "k", "--codec", "topk", "--budget-bytes-per-token", "24")
    assert res.exit_code == 0, res.stderr
    # Both codecs' budgets count their columns as stored (compressed), measured on the probe.
    r = CacheReader(str(tmp_path / "k"))
    k = r.codec.k
    assert 1 <= k < 64
    assert f"--budget-bytes-per-token 24: topk chose top_k = {k}" in res.stderr
    cols = read_all(tmp_path / "k")
    assert r.codec.stored_bytes_per_token(cols, len(cols["logsumexp"])) <= 24 * 1.15
    res = said(tmp_path / "n", "--budget-bytes-per-token", "12")
    r = CacheReader(str(tmp_path / "n"))
    assert res.exit_code == 0 and 1 <= r.codec.n < 50
    assert f"--budget-bytes-per-token 12: sampled chose samples = {r.codec.n}" in res.stderr
    stored = r.codec.stored_bytes_per_token(
        cols := read_all(tmp_path / "n"), len(cols["sampled_n"])
    )
    assert stored <= 12 * 1.15
    assert r.manifest["stats"]["disk_bytes_per_token"] > stored  # the whole files: keys, footers
    res = cli(*lm_args(tmp_path / "x", "--codec", "topk", "--budget-bytes-per-token", "5"))
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "--budget-bytes-per-token 5", "raise it")


def test_bad_lm_inputs_get_one_line(tmp_path, cli):
    res = cli(*lm_args(tmp_path / "a", "--codec", "sampled", "--task", "classification"))
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "--codec sampled cannot store a classification teacher")
    res = cli(*lm_args(tmp_path / "b", "--teacher", "tests.toy_models:ToyNet"))
    assert res.exit_code == 1
    assert_one_line_error(res.stderr, "teacher's forward failed", "--task causal-lm")
    res = cli(
        *lm_args(
            tmp_path / "c",
            "--teacher",
            "tests.toy_models:ToyNet",
            "--teacher-arg",
            "out=tensor",
            "--data",
            "tests.toy_models:ToyData",
            "--task",
            "causal-lm",
        )
    )
    assert res.exit_code == 2


def test_kill_9_mid_run_then_rerun_is_byte_identical(tmp_path):
    """SIGKILL mid-run; the same command finishes the store, byte for byte as an uninterrupted
    run, the sampled codec's draws included (seeded per row, not per run)."""
    out = tmp_path / "s"
    args = lm_args(out, "--teacher-arg", "sleep=0.05", n=40)
    kill_9_after_commits(args, out)
    again = subprocess.run(kdcache_cmd(*args), cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    ref = tmp_path / "ref"
    done = subprocess.run(kdcache_cmd(*lm_args(ref, n=40)), cwd=REPO, capture_output=True)
    assert done.returncode == 0
    assert files_under(out) == files_under(ref)


def test_a_layout_1_store_trains_and_is_never_resumed_as_layout_2(tmp_path, cli, monkeypatch):
    """A store written before layout 2 (`soft_labels` without `layout`: ids as they are, snappy)
    verifies and trains; today's precompute into it, finished or interrupted, is refused in one
    line naming the layout, so no store ever mixes the two."""
    configure = Sampled.configure.__func__

    def before_layout_2(cls, values, task):
        return {k: v for k, v in configure(cls, values, task).items() if k != "layout"}

    monkeypatch.setattr(Sampled, "configure", classmethod(before_layout_2))
    out = tmp_path / "old"
    assert cli(*lm_args(out)).exit_code == 0
    monkeypatch.undo()
    r = CacheReader(str(out))
    assert "layout" not in r.soft and r.codec.layout == 1 and r.verify() == []
    assert "sampled_ids" in pq.read_schema(out / "soft_labels" / "part-00000.parquet").names
    assert cli("verify", out).exit_code == 0
    res = cli(
        "train", "--cache", out, "--student", "tests.toy_models:ToyCausalLM", "--data", DATA,
        "--data-arg", "n=24", "--epochs", "1", "--batch-size", "8", "--out", tmp_path / "student",
        "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    rows = (tmp_path / "student" / "metrics.csv").read_text().splitlines()
    soft = float(rows[1].split(",")[rows[0].split(",").index("soft_loss")])
    assert np.isfinite(soft) and soft > 0
    for interrupted in (False, True):
        if interrupted:
            (out / "manifest.json").unlink()  # as a killed run leaves it: only _run.json
        res = cli(*lm_args(out))
        assert res.exit_code == 2
        assert_one_line_error(res.stderr, "soft_labels.layout: None -> 2", "--force")
