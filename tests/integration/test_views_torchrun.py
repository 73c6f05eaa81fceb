"""A store of augmented views under `torchrun --nproc-per-node 2`: the same bytes as one process,
and a DDP student that replays it."""

from __future__ import annotations

import json

import pytest

from tests.conftest import files_under, kdcache_cmd
from tests.integration.conftest import run_proc, torchrun, toy_train_args
from tests.integration.test_torchrun import N, precompute_args

pytestmark = pytest.mark.distributed
VIEWS = ("--views", "3", "--augment", "kdcache.pipeline.examples.augment:signal_1d")


def test_two_ranks_write_the_views_one_process_does_and_a_ddp_student_replays_them(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    res = run_proc(kdcache_cmd(*precompute_args(one, *VIEWS)))
    assert res.returncode == 0, res.stderr
    res = run_proc(torchrun(2, *precompute_args(two, *VIEWS)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count(f"({N} samples x 3 views)") == 1, res.stdout
    assert files_under(two) == files_under(one) and len(files_under(one)) > 3

    args = toy_train_args(two, tmp_path / "student", N, "--epochs", "2", "--log-json")
    res = run_proc(torchrun(2, *args))
    assert res.returncode == 0, res.stderr[-3000:]
    [report] = [json.loads(line) for line in res.stdout.splitlines()]
    assert report["status"] == "done" and report["final"]["epoch"] == 2
    settings = json.loads((tmp_path / "student" / "summary.json").read_text())["settings"]
    assert settings["augment"] == VIEWS[-1]
