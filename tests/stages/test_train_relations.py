"""Stage two's relation term (--relation, --gamma) and the pseudo-label baseline (--pseudo-labels):
the loss wiring on real batches from top-k and dense caches, whole runs, a [[students]] file and
the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcache.pipeline.jobs import train as run
from kdcache.stages.common.hooks import pool
from kdcache.stages.train import relations
from kdcache.storage.errors import UsageError
from tests.conftest import toy_precompute
from tests.stages.test_train import build, config, teacher_logits

N = 256
MISSING = 3  # every third row unlabeled


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("relation-caches")
    common = {"data_args": {"n": N, "every_missing": MISSING}, "shard_rows": 64, "batch_size": 64}
    toy_precompute(root / "topk", top_k=4, features="body", **common)
    toy_precompute(root / "dense", codec="dense", dtype="float32", features="body", **common)
    toy_precompute(root / "nofeat", top_k=4, **common)
    return {name: str(root / name) for name in ("topk", "dense", "nofeat")}


def cfg_for(tmp_path, caches, cache="topk", **overrides):
    overrides.setdefault("data_args", {"n": N, "every_missing": MISSING})
    return config(tmp_path / "o", caches[cache], **overrides)


def first_batch(trainer):
    trainer.setup()
    trainer.stream.set_epoch(1)
    return next(iter(trainer.stream))


@pytest.mark.parametrize("cache", ["topk", "dense"])
@pytest.mark.parametrize("name", ["rkd-distance", "sp"])
def test_relation_term_with_beta_0(tmp_path, caches, cache, name):
    trainer = build(
        cfg_for(tmp_path, caches, cache, relation=name, gamma=2.5, student_features="body")
    )
    batch = first_batch(trainer)
    # The tap feeds the relation only: no projector, no feature term, but features streamed.
    assert isinstance(trainer.model.projector, torch.nn.Identity)
    assert batch["features"].shape == (len(batch["sample_id"]), 16)
    with torch.no_grad():
        z, proj = trainer.model(batch["input"])
        assert proj is None
        terms = trainer.loss_terms(z, proj, batch)
        f_s = pool(trainer.student.body(batch["input"]), "avg")  # the student is 8-d
        want_rel = relations.relation_loss(name, f_s, batch["features"].float())
    assert float(terms["relation_loss"]) == pytest.approx(float(want_rel), rel=1e-5)
    assert float(terms["relation_loss"]) > 0 and float(terms["feature_loss"]) == 0
    a = trainer.cfg.alpha
    want = a * terms["soft_loss"] + (1 - a) * terms["hard_loss"] + 2.5 * terms["relation_loss"]
    assert float(terms["loss"]) == pytest.approx(float(want), rel=1e-6)


def test_relation_beside_the_feature_term(tmp_path, caches):
    trainer = build(
        cfg_for(tmp_path, caches, relation="rkd", gamma=0.5, beta=1.0, student_features="body")
    )
    batch = first_batch(trainer)
    assert isinstance(trainer.model.projector, torch.nn.Linear)  # 8-d student, 16-d teacher
    with torch.no_grad():
        z, proj = trainer.model(batch["input"])
        terms = trainer.loss_terms(z, proj, batch)
        f_s = pool(trainer.student.body(batch["input"]), "avg")
        # The relation sees the student's own 8-d features, not the projected 16-d ones.
        want_rel = relations.rkd(f_s, batch["features"].float())
    assert float(terms["relation_loss"]) == pytest.approx(float(want_rel), rel=1e-5)
    a = trainer.cfg.alpha
    want = (
        a * terms["soft_loss"] + (1 - a) * terms["hard_loss"]
        + terms["feature_loss"] + 0.5 * terms["relation_loss"]
    )  # fmt: skip
    assert float(terms["loss"]) == pytest.approx(float(want), rel=1e-6)


def test_a_relation_run_records_its_term_and_settings(tmp_path, caches):
    cfg = cfg_for(tmp_path, caches, "dense", relation="rkd-distance", gamma=3.0,
                  student_features="body", epochs=2)  # fmt: skip
    result = run(cfg)
    assert result["status"] == "done"
    rows = result["rows"]
    assert all(r["relation_loss"] > 0 for r in rows)
    assert rows[-1]["relation_loss"] < rows[0]["relation_loss"]  # it is being learned
    text = (tmp_path / "o" / "metrics.csv").read_text().splitlines()
    assert "relation_loss" in text[0].split(",")
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["settings"]["relation"] == "rkd-distance"
    assert summary["settings"]["gamma"] == 3.0
    assert run(cfg)["status"] == "done-before"  # rerun: a no-op


@pytest.mark.parametrize("cache", ["topk", "dense"])
def test_pseudo_labels_are_the_teachers_top1_on_every_row(tmp_path, caches, cache):
    trainer = build(cfg_for(tmp_path, caches, cache, pseudo_labels=True, alpha=0.0))
    batch = first_batch(trainer)
    data_labels = np.where(batch["sample_id"].numpy() % MISSING == 0, -1, 0)
    assert (data_labels == -1).any()  # the batch holds unlabeled rows ...
    want = teacher_logits(batch["input"]).argmax(-1)
    assert torch.equal(batch["label"], want)  # ... and every row is labeled with the teacher's
    with torch.no_grad():
        z = trainer.student(batch["input"])
        terms = trainer.loss_terms(z, None, batch)
    assert float(terms["hard_loss"]) == pytest.approx(float(F.cross_entropy(z, want)), rel=1e-6)
    assert float(terms["loss"]) == pytest.approx(float(terms["hard_loss"]), rel=1e-6)


def test_pseudo_label_student_trains_and_records_it(tmp_path, caches):
    cfg = cfg_for(tmp_path, caches, pseudo_labels=True, alpha=0.0, epochs=2)
    result = run(cfg)
    assert result["summary"]["settings"]["pseudo_labels"] is True
    rows = result["rows"]
    assert rows[-1]["hard_loss"] < rows[0]["hard_loss"]
    assert all(r["relation_loss"] == 0 for r in rows)


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        ({"relation": "sp"}, ("--relation sp", "--student-features")),
        ({"relation": "nope", "student_features": "body"}, ("--relation 'nope'", "rkd")),
        ({"relation": "sp", "student_features": "body", "gamma": -1.0}, ("--gamma -1.0",)),
        ({"relation": "sp", "student_features": "body", "cache": None}, ("--relation", "--cache")),
        ({"pseudo_labels": True, "cache": None}, ("--pseudo-labels", "--cache")),
        (
            {"relation": "sp", "student_features": "body", "cache": "nofeat"},
            ("--relation sp", "no", "--features"),
        ),
        ({"relation": "sp", "student_features": "nope"}, ("--student-features 'nope'",)),
    ],
)
def test_bad_relation_options_fail_before_training(tmp_path, caches, overrides, needles):
    overrides = dict(overrides)
    name = overrides.pop("cache", "topk")
    out = tmp_path / "o"
    data = {"n": N, "every_missing": MISSING}
    cfg = config(out, caches[name] if name else None, data_args=data, **overrides)
    with pytest.raises(UsageError) as err:
        run(cfg)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert not out.exists() or not list(out.iterdir())


STUDENTS = """
cache = "{cache}"
data = "tests.toy_models:ToyData"
data_args = {{n = {n}, every_missing = {m}}}
eval_data = "tests.toy_models:ToyData"
eval_data_args = {{n = 40}}
student = "tests.toy_models:ToyNet"
student_args = {{dim = 8}}
epochs = 1
batch_size = 32
device = "cpu"

[[students]]
name = "rkd"
relation = "rkd-distance"
gamma = 25.0
student_features = "body"

[[students]]
name = "pseudo"
alpha = 0.0
pseudo_labels = true
"""


def test_relation_and_pseudo_students_from_a_toml(tmp_path, cli, caches):
    toml = tmp_path / "students.toml"
    toml.write_text(STUDENTS.format(cache=caches["topk"], n=N, m=MISSING))
    res = cli("train", "--config", toml, "--out", tmp_path / "out", "--quiet")
    assert res.exit_code == 0, res.stderr
    assert [line.split(":")[0] for line in res.stdout.splitlines()] == [
        "trained rkd",
        "trained pseudo",
    ]
    rkd = json.loads((tmp_path / "out" / "rkd" / "summary.json").read_text())["settings"]
    pseudo = json.loads((tmp_path / "out" / "pseudo" / "summary.json").read_text())["settings"]
    assert (rkd["relation"], rkd["gamma"], rkd["pseudo_labels"]) == ("rkd-distance", 25.0, False)
    assert (pseudo["relation"], pseudo["pseudo_labels"], pseudo["alpha"]) == (None, True, 0.0)

    # What the settings say, the loss did: the relation term is in rkd's every epoch and in
    # pseudo's none; with alpha 0 pseudo's loss is its hard term alone (the soft term is logged,
    # weighted by 0).
    def column(name: str, key: str) -> list[float]:
        rows = (tmp_path / "out" / name / "metrics.csv").read_text().splitlines()
        i = rows[0].split(",").index(key)
        return [float(r.split(",")[i]) if r.split(",")[i] else 0.0 for r in rows[1:]]

    assert column("rkd", "relation_loss") and all(v > 0 for v in column("rkd", "relation_loss"))
    assert all(v == 0 for v in column("pseudo", "relation_loss"))
    assert column("pseudo", "loss") == pytest.approx(column("pseudo", "hard_loss"), rel=1e-6)


def test_the_mnist1d_job_has_a_relation_and_a_pseudo_label_student():
    import tomllib

    from tests.conftest import REPO

    doc = tomllib.loads((REPO / "configs" / "students.toml").read_text())
    shared = {k: v for k, v in doc.items() if k != "students"}
    students = {s["name"]: shared | s for s in doc["students"]}
    relation = [s for s in students.values() if s.get("relation")]
    assert relation and all(s["student_features"] and s.get("beta", 0) == 0 for s in relation)
    pseudo = [s for s in students.values() if s.get("pseudo_labels")]
    assert [s["alpha"] for s in pseudo] == [0.0]  # the teacher's top-1 alone: no soft term
    assert pseudo[0]["student"] == students["mlp-hard"]["student"]  # beside the hard baseline
