"""The report with a pseudo-label baseline, a relation student and the deployment section, on a
tiny real job (toy teacher, its cache, four students)."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
from click.testing import CliRunner

from kdcache.pipeline.cli import main
from kdcache.pipeline.jobs import precompute, train
from kdcache.stages.precompute.run import PrecomputeConfig
from kdcache.stages.train.trainer import TrainConfig

DATA = "tests.toy_models:ToyBatchData"
NET = "tests.toy_models:ToyNet"


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy-job") / "runs"
    common = dict(data=DATA, data_args={"n": 96}, eval_data=DATA, eval_data_args={"n": 40})
    common.update(epochs=2, batch_size=16, device="cpu", quiet=True)
    train(TrainConfig(student=NET, out=str(root / "teacher"), **common))
    cache = str(root / "cache")
    precompute(
        PrecomputeConfig(
            teacher=NET, checkpoint=str(root / "teacher" / "model.pt"), data=DATA,
            data_args={"n": 96}, out=cache, features="body", device="cpu", quiet=True,
        )
    )  # fmt: skip
    students = {
        "hard": dict(alpha=0.0),
        "pseudo": dict(alpha=0.0, pseudo_labels=True),
        "kd": dict(temperature=2.0),
        "rel": dict(relation="sp", gamma=10.0, student_features="body"),
    }
    for name, extra in students.items():
        out = str(root / "students" / name)
        args = {"student_args": {"seed": 1}, "cache": cache, "out": out}
        train(TrainConfig(student=NET, **args, **common, **extra))
    return root


def report(root, *args):
    res = CliRunner().invoke(main, ["report", "--runs", str(root), *args])
    assert res.exit_code == 0, res.output
    return json.loads((root / "report.json").read_text()), (root / "report.md").read_text()


def test_pseudo_label_and_relation_students_in_the_tables_and_headline(job):
    doc, md = report(job, "--no-deploy")
    by = {s["name"]: s for s in doc["students"]}
    assert {n: s["kind"] for n, s in by.items()} == {
        "hard": "hard labels",
        "pseudo": "pseudo-labels",
        "kd": "KD",
        "rel": "KD + relations",
    }
    assert by["rel"]["relation"] == "sp (gamma 10)" and by["pseudo"]["temperature"] is None
    assert "| KD + sp (gamma 10) |" in md
    # Neither baseline can be the best distilled student; the gain over each is stated.
    assert doc["baseline"] == "hard" and doc["best_student"] in ("kd", "rel")
    best = by[doc["best_student"]]["test_accuracy"]
    assert doc["pseudo_baseline"] == "pseudo"
    want = round(100 * (best - by["pseudo"]["test_accuracy"]), 4)
    assert doc["gain_over_pseudo_points"] == pytest.approx(want)
    assert f"(pseudo, {100 * by['pseudo']['test_accuracy']:.1f}%)" in md
    assert f"**{doc['gain_over_pseudo_points']:+.1f} points**" in md
    assert "deploy" not in doc and "costs to run" not in md


def test_deployment_rows_table_and_plot(job):
    doc, md = report(job)
    d = doc["deploy"]
    rows = [(r["name"], r["precision"]) for r in d["models"]]
    students = [s["name"] for s in doc["students"]]
    want = [("teacher", "float32")] + [(n, p) for n in students for p in ("float32", "int8")]
    assert rows == want  # the teacher is not quantized; every student is
    by = {(r["name"], r["precision"]): r for r in d["models"]}
    for s in doc["students"]:
        f, q = by[(s["name"], "float32")], by[(s["name"], "int8")]
        assert f["accuracy"] == s["test_accuracy"] and 0 <= q["accuracy"] <= 1
        assert f["params"] == q["params"] == s["num_params"]
        assert f["latency_b1"] > 0 and q["samples_per_sec"] > 0
        size = (job / "students" / s["name"] / "model.pt").stat().st_size
        assert f["weight_bytes"] == size
    assert d["threads"] >= 1 and d["plots"] == ["accuracy_vs_latency.png"]
    assert "## What each model costs to run (CPU)" in md
    assert f"on {d['threads']} CPU thread(s)" in md
    assert "| teacher | float32 |" in md and "| rel | int8 |" in md
    assert "![test accuracy against batch-1 latency](accuracy_vs_latency.png)" in md
    image = matplotlib.image.imread(job / "accuracy_vs_latency.png")
    assert image.shape[0] > 300 and image.shape[1] > 600
    # --no-agreement loads no model: nothing is timed either.
    doc, _ = report(job, "--no-agreement")
    assert "deploy" not in doc


def test_headline_names_ties_and_the_pseudo_label_gain():
    from kdcache.stages.report.run import _headline
    from kdcache.stages.report.text import headline

    def e(name, kind, acc, spec="m:MLP"):
        return {"name": name, "kind": kind, "test_accuracy": acc, "spec": spec,
                "model_args": {}, "model": spec[2:]}  # fmt: skip

    students = [
        e("hard", "hard labels", 0.6), e("pseudo", "pseudo-labels", 0.88),
        e("a", "KD + relations", 0.905), e("b", "KD + features", 0.905), e("c", "KD", 0.9),
        e("cnn", "KD", 0.95, "m:CNN"), e("cnn-pseudo", "pseudo-labels", 0.94, "m:CNN"),
    ]  # fmt: skip
    report = {"students": students, "teacher": None}
    report.update(_headline(report))
    assert (report["baseline"], report["best_student"], report["best_ties"]) == ("hard", "a", ["b"])
    # The pseudo-label student of the best one's architecture, not the better one of another.
    assert report["pseudo_baseline"] == "pseudo"
    assert report["gain_over_pseudo_points"] == pytest.approx(2.5)
    text = headline(report)
    assert "+30.5 points** (tied with b)." in text and "(pseudo, 88.0%): **+2.5 points**" in text
