"""Run folders on any fsspec URL: train into memory://, then `evaluate` and `report` read it."""

from __future__ import annotations

import json

import pytest

from kdcache.pipeline.jobs import evaluate, report, train
from kdcache.stages.evaluate.run import EvaluateConfig
from kdcache.stages.report.run import ReportConfig
from kdcache.stages.train.run_folder import RunFolder
from kdcache.stages.train.trainer import TrainConfig
from kdcache.storage.errors import UsageError

DATA = "tests.toy_models:ToyData"


def test_train_evaluate_and_report_on_a_memory_run_folder(memory_url, tmp_path):
    common = dict(
        data=DATA, data_args={"n": 64}, eval_data=DATA, eval_data_args={"n": 32, "seed": 1},
        epochs=2, batch_size=16, device="cpu", quiet=True, student="tests.toy_models:ToyNet",
    )  # fmt: skip
    train(TrainConfig(out=f"{memory_url}/teacher", **common))
    done = train(TrainConfig(out=f"{memory_url}/students/s", student_args={"seed": 1}, **common))
    folder = RunFolder(f"{memory_url}/students/s")
    assert folder.summary() == done["summary"] and len(folder.rows()) == 2
    assert folder.checkpoint_epochs() == [1, 2] and folder.loc.exists("model.pt")

    got = evaluate(EvaluateConfig(checkpoint=folder.url, data=DATA, data_args={"n": 32, "seed": 1}))
    final = done["summary"]["final"]
    assert got["n"] == 32 and got["name"] == "s"
    assert got["accuracy"] == pytest.approx(final["eval_accuracy"], abs=1e-9)

    out = tmp_path / "report.md"
    doc = report(ReportConfig(runs=memory_url, out=str(out)))
    assert [s["name"] for s in doc["students"]] == ["s"] and doc["teacher"] is not None
    assert doc["students"][0]["agreement"] is not None  # both models loaded from memory://
    assert doc["students"][0]["folder"] == folder.url
    assert json.loads((tmp_path / "report.json").read_text())["students"][0]["name"] == "s"
    assert "| s |" in out.read_text()
    assert (tmp_path / "accuracy_bars.png").stat().st_size > 0


def test_report_on_a_missing_url_folder_is_a_usage_error(memory_url):
    with pytest.raises(UsageError, match="no such folder"):
        report(ReportConfig(runs=memory_url, plots=False))
