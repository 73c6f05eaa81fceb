"""The regression example end to end at small size: scikit-learn's diabetes data, a ridge teacher,
two caches and five students (targets only, teacher only, both), then the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from kdcache.pipeline.examples import diabetes
from kdcache.storage.reader import CacheReader

TRANSFER = 200


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("diabetes")
    return out, diabetes.run(str(out), epochs=10, transfer=TRANSFER, hidden=8)


def test_teacher_is_the_ridge_fit_of_the_train_rows(job):
    out, report = job
    a = diabetes._arrays()
    assert len(a["y_train"]) == 300 and len(a["y_test"]) == 142
    ridge = Ridge(alpha=10.0).fit(a["x_train"], a["y_train"])
    state = torch.load(out / "teacher.pt")
    np.testing.assert_allclose(state["head.weight"][0].numpy(), ridge.coef_, rtol=1e-4)
    assert float(state["head.bias"]) == pytest.approx(ridge.intercept_, rel=1e-5)
    p = ridge.predict(a["x_test"])
    assert report["teacher_test"]["test_r2"] == pytest.approx(ridge.score(a["x_test"], a["y_test"]))
    assert report["teacher_test"]["test_mse"] == pytest.approx(
        ((p - a["y_test"]) ** 2).mean(), rel=1e-5
    )


def test_caches_keep_targets_only_for_the_labelled_rows(job):
    out, _ = job
    train, transfer = (
        CacheReader(str(out / "cache/train")),
        CacheReader(str(out / "cache/transfer")),
    )
    assert (train.num_rows, train.target_rows) == (300, 300)
    assert (transfer.num_rows, transfer.target_rows) == (300 + TRANSFER, 300)
    # The same 300 labelled rows first in both: the same teacher error on their targets.
    stats = train.manifest["stats"], transfer.manifest["stats"]
    assert stats[0]["teacher_mse"] == pytest.approx(stats[1]["teacher_mse"], rel=1e-9)
    cols = transfer.read_shard(0)
    assert np.isnan(cols["target"][cols["sample_id"] >= 300]).all()


def test_students_and_report(job):
    out, report = job
    reg = report["regression"]
    by_name = {e["name"]: e for e in reg["students"]}
    assert set(by_name) == {name for name, _, _ in diabetes.STUDENTS}
    assert [by_name[n]["alpha"] for n, _, _ in diabetes.STUDENTS] == [
        a for _, _, a in diabetes.STUDENTS
    ]
    assert by_name["targets-only"]["loss"].startswith("targets only")
    assert all(e["eval_mse"] > 0 and e["eval_r2"] is not None for e in reg["students"])
    # A student taught by the teacher alone imitates it more closely than one taught by targets.
    assert by_name["teacher-only"]["teacher_mse"] < by_name["targets-only"]["teacher_mse"]
    md = (out / "report.md").read_text()
    assert "## Regression students" in md and all(
        f"| {n} |" in md or f"**{n}**" in md for n in by_name
    )
    assert json.loads((out / "report.json").read_text())["regression"]["best"] == reg["best"]
