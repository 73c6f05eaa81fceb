"""`kdcache report` on a real (tiny) job: a toy teacher, its cache, three students trained from it."""

from __future__ import annotations

import json
import shutil

import matplotlib.image
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdcache.pipeline.cli import main
from kdcache.pipeline.jobs import collect_report as collect
from kdcache.pipeline.jobs import precompute, train
from kdcache.stages.precompute.run import PrecomputeConfig
from kdcache.stages.report.run import ReportConfig
from kdcache.stages.train.trainer import TrainConfig
from tests.toy_models import ToyBatchData, ToyNet

DATA = "tests.toy_models:ToyBatchData"
NET = "tests.toy_models:ToyNet"
EVAL = {"n": 40, "seed": 1}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """RUNS/{teacher, cache, students/{hard,kd,feat}} made by the real stages, in that order."""
    root = tmp_path_factory.mktemp("job") / "runs"
    common = dict(data=DATA, data_args={"n": 64}, eval_data=DATA, eval_data_args=EVAL)
    common.update(epochs=2, batch_size=16, device="cpu", quiet=True)
    train(TrainConfig(student=NET, out=str(root / "teacher"), **common))
    cache = str(root / "cache")
    precompute(
        PrecomputeConfig(
            teacher=NET,
            checkpoint=str(root / "teacher" / "model.pt"),
            data=DATA,
            data_args={"n": 64},
            out=cache,
            codec_options={"top_k": 3},
            features="body",
            shard_rows=32,
            device="cpu",
            quiet=True,
        )
    )
    students = {
        "hard": dict(alpha=0.0),
        "kd": dict(temperature=2.0),
        "feat": dict(beta=1.0, student_features="body"),
    }
    for name, extra in students.items():
        out = str(root / "students" / name)
        train(
            TrainConfig(
                student=NET, student_args={"seed": 1}, cache=cache, out=out, **common, **extra
            )
        )
    return root


def _report(root, *args):
    result = CliRunner().invoke(main, ["report", "--runs", str(root), *args])
    return result, root / "report.json"


def test_report_files_and_headline(job):
    result, path = _report(job)
    assert result.exit_code == 0, result.output
    doc = json.loads(path.read_text())
    assert [s["name"] for s in doc["students"]] == ["hard", "kd", "feat"]
    for s in doc["students"]:
        summary = json.loads((job / "students" / s["name"] / "summary.json").read_text())
        assert s["test_accuracy"] == summary["test_accuracy"]
        assert s["num_params"] == summary["num_params"]
        assert len(s["curve"]) == 2
    kinds = {s["name"]: s["kind"] for s in doc["students"]}
    assert kinds == {"hard": "hard labels", "kd": "KD", "feat": "KD + features"}
    assert doc["baseline"] == "hard"
    acc = {s["name"]: s["test_accuracy"] for s in doc["students"]}
    best = max(("kd", "feat"), key=acc.get)
    assert doc["best_student"] == best
    assert doc["gain_points"] == pytest.approx(100 * (acc[best] - acc["hard"]), abs=1e-3)
    assert doc["teacher"]["name"] == "teacher" and doc["teacher"]["test_accuracy"] is not None
    md = (job / "report.md").read_text()
    for name in ("teacher", "hard", "kd", "feat", "(n - 1) * t", "accuracy_bars.png"):
        assert name in md
    assert "wrote" in result.output and "| hard |" in result.output
    # No RUNS/lm: no language-model section, key or plot.
    assert "lm" not in doc and "Language model" not in md
    assert doc["plots"] == ["accuracy_curves.png", "accuracy_bars.png"]
    for png in ("accuracy_curves.png", "accuracy_bars.png"):
        image = matplotlib.image.imread(str(job / png))
        assert image.shape[0] > 300 and image.shape[1] > 500  # a real picture, not an empty file


def test_agreement_is_recomputed_on_the_eval_data(job):
    doc = collect(ReportConfig(runs=str(job), plots=False))
    x = ToyBatchData(**EVAL).get_batch(np.arange(EVAL["n"]))["input"]

    def top1(folder, **kwargs):
        net = ToyNet(**kwargs).eval()
        net.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        with torch.no_grad():
            return net(x).argmax(-1)

    teacher = top1(job / "teacher")
    for s in doc["students"]:
        mine = top1(job / "students" / s["name"], seed=1)
        assert s["agreement"] == pytest.approx(float((mine == teacher).double().mean()))


def test_cache_section_and_time_saved(job):
    doc = collect(ReportConfig(runs=str(job), plots=False, agreement=False))
    (cache,) = doc["caches"]
    manifest = json.loads((job / "cache" / "manifest.json").read_text())
    t = manifest["stats"]["teacher_seconds"]
    assert cache["rows"] == 64 and cache["shards"] == 2 and cache["top_k"] == 3
    assert cache["bytes_per_sample"] == manifest["stats"]["bytes_per_sample"]
    assert cache["students"] == ["kd", "feat"]  # the baseline never reads the teacher's outputs
    saved = cache["time_saved"]
    assert saved["one_pass_each_seconds"] == pytest.approx((2 - 1) * t)
    assert saved["online_seconds"] == pytest.approx((2 + 2 - 1) * t)
    assert cache["stale_students"] == []


def test_unfinished_student_and_missing_teacher(job, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(job, root)
    shutil.rmtree(root / "teacher")
    (root / "students" / "half-done").mkdir()
    (root / "students" / "half-done" / "checkpoint-1.pt").write_bytes(b"")
    result, path = _report(root)
    assert result.exit_code == 0, result.output
    doc = json.loads(path.read_text())
    assert doc["teacher"] is None and doc["unfinished"] == ["half-done"]
    assert all(s["agreement"] is None for s in doc["students"])
    assert "half-done" in (root / "report.md").read_text()
    assert (root / "accuracy_bars.png").stat().st_size > 0


def test_rerun_gives_the_same_report(job, tmp_path):
    out = [tmp_path / "a.md", tmp_path / "b.md"]
    docs = []
    for md in out:
        result = CliRunner().invoke(
            main, ["report", "--runs", str(job), "--out", str(md), "--no-plots"]
        )
        assert result.exit_code == 0, result.output
        doc = json.loads(md.with_suffix(".json").read_text())
        doc.pop("generated")
        doc.pop("deploy")  # measured latencies differ from run to run
        docs.append(doc)
    assert docs[0] == docs[1]
    assert not (tmp_path / "accuracy_bars.png").exists()


def test_no_finished_student_is_a_usage_error(tmp_path):
    (tmp_path / "students" / "x").mkdir(parents=True)
    result, _ = _report(tmp_path)
    assert result.exit_code == 2
    assert "no finished student" in result.output and str(tmp_path / "students") in result.output
    result, _ = _report(tmp_path / "nowhere")
    assert result.exit_code == 2 and "no such folder" in result.output
