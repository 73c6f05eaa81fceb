"""A relation student (its features reach the loss through the tap, not through DDP's output)
and a pseudo-label student, from one [[students]] file, under `torchrun` with two gloo ranks."""

from __future__ import annotations

import json

import pytest

from kdcache.stages.train.run_folder import RunFolder
from tests.conftest import DATA, TEACHER, toy_precompute
from tests.integration.conftest import run_proc, torchrun

pytestmark = pytest.mark.distributed

N = 100

STUDENTS = f"""
data = "{DATA}"
data_args = {{n = {N}, every_missing = 4}}
eval_data = "{DATA}"
eval_data_args = {{n = {N}}}
student = "{TEACHER}"
student_args = {{seed = 5, dim = 8}}
epochs = 2
batch_size = 10
device = "cpu"

[[students]]
name = "rkd"
relation = "rkd"
gamma = 5.0
student_features = "body"

[[students]]
name = "pseudo"
alpha = 0.0
pseudo_labels = true
"""


def test_relation_and_pseudo_label_students_on_two_ranks(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "students"
    toy_precompute(cache, data_args={"n": N, "every_missing": 4}, features="body")
    toml = tmp_path / "students.toml"
    toml.write_text(STUDENTS)
    args = ["train", "--config", toml, "--cache", cache, "--out", out, "--log-json"]
    res = run_proc(torchrun(2, *args))
    assert res.returncode == 0, res.stderr[-3000:]
    reports = [json.loads(line) for line in res.stdout.splitlines()]  # rank 0 alone reports
    assert [r["status"] for r in reports] == ["done", "done"]
    rkd = RunFolder(str(out / "rkd")).rows()
    assert len(rkd) == 2 and all(r["relation_loss"] > 0 for r in rkd)
    assert all(r["feature_loss"] == 0 for r in rkd)  # --beta 0: the tap feeds the relation only
    pseudo = RunFolder(str(out / "pseudo")).rows()
    assert all(r["relation_loss"] == 0 and r["hard_loss"] > 0 for r in pseudo)
    summary = json.loads((out / "pseudo" / "summary.json").read_text())
    assert summary["settings"]["pseudo_labels"] is True
