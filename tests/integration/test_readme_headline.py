"""The README's headline, measured: on MNIST-1D the distilled MLP is far above the same MLP on
hard labels. The teacher, the cache and the two students are made exactly as `make run` makes
them (configs/teacher.toml, the Makefile's precompute flags, configs/students.toml)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import REPO, kdcache_cmd
from tests.integration.conftest import run_proc, subprocess_env

pytestmark = pytest.mark.slow

MNIST1D = "kdcache.pipeline.examples.mnist1d:MNIST1D"


def test_distilled_mlp_far_above_the_hard_label_mlp(tmp_path):
    """README (from its last `make run`): mlp-kd-t4-feat 90.5 % against mlp-hard 64.7 %
    (+25.8 points). Asserted with room for another machine's float rounding: at least 15 points
    apart, distilled >= 85 %."""
    env = subprocess_env(KDCACHE_DATA_DIR=str(tmp_path / "data"))
    teacher, cache, students = tmp_path / "teacher", tmp_path / "cache", tmp_path / "students"
    args = ["train", "--config", REPO / "configs/teacher.toml", "--out", teacher, "--quiet"]
    res = run_proc(kdcache_cmd(*args), env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    args = [
        "precompute", "--teacher", "kdcache.pipeline.examples.models:TeacherCNN",
        "--checkpoint", teacher / "model.pt", "--data", MNIST1D, "--data-arg",
        "split=train+transfer", "--out", cache, "--codec", "topk", "--top-k", "8",
        "--temperature", "4", "--features", "features", "--shard-rows", "4096", "--quiet",
    ]  # fmt: skip
    res = run_proc(kdcache_cmd(*args), env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    names = ("mlp-hard", "mlp-kd-t4-feat")
    procs = [
        subprocess.Popen(
            kdcache_cmd(
                "train",
                "--config",
                REPO / "configs/students.toml",
                "--cache",
                cache,
                "--out",
                students,
                "--only",
                name,
                "--quiet",
            ),
            cwd=REPO,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name in names
    ]
    for p in procs:
        assert p.wait(timeout=900) == 0, p.stderr.read()[-3000:]
    acc = {
        n: json.loads((students / n / "summary.json").read_text())["final"]["eval_accuracy"]
        for n in names
    }
    print(f"MNIST-1D test accuracy: {acc}")
    assert acc["mlp-kd-t4-feat"] >= 0.85, acc
    assert acc["mlp-kd-t4-feat"] - acc["mlp-hard"] >= 0.15, acc
