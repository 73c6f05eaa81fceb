"""The report's augmentation section on a tiny real job: replayed views, naive, no augmentation."""

from __future__ import annotations

import pytest

from kdcache.pipeline.jobs import collect_report, precompute, report, train
from kdcache.stages.precompute.run import PrecomputeConfig
from kdcache.stages.report.run import ReportConfig
from kdcache.stages.train.trainer import TrainConfig

DATA = "tests.toy_models:ToyBatchData"
NET = "tests.toy_models:ToyNet"
SHIFT = "kdcache.pipeline.examples.augment:signal_1d"


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("views-job") / "runs"
    caches = {"plain": {"features": "body"}, "views": {"views": 3, "augment": SHIFT}}
    for name, extra in caches.items():
        precompute(
            PrecomputeConfig(
                teacher=NET,
                data=DATA,
                data_args={"n": 48},
                out=str(root / name),
                shard_rows=16,
                device="cpu",
                quiet=True,
                **extra,
            )
        )
    common = dict(student=NET, data=DATA, data_args={"n": 48}, eval_data=DATA)
    common.update(eval_data_args={"n": 20, "seed": 1}, epochs=2, batch_size=16, quiet=True)
    students = {
        "kd": ("plain", {}),
        "naive": ("plain", {"augment": SHIFT}),
        "views": ("views", {}),
        "kd-t2": ("plain", {"temperature": 2.0}),  # another student: not in the section
        # Another loss (a relation term) on the same model, T, alpha, beta: not the twin either.
        "kd-rkd": (
            "plain",
            {"relation": "rkd-distance", "gamma": 1.0, "student_features": "body"},
        ),
    }
    for name, (cache, extra) in students.items():
        out = str(root / "students" / name)
        train(TrainConfig(cache=str(root / cache), out=out, device="cpu", **common, **extra))
    return root


def test_the_section_pairs_each_augmented_student_with_its_cache(job):
    cfg = ReportConfig(runs=str(job), agreement=False, plots=False)
    views = collect_report(cfg)["views"]
    rows = {r["name"]: r for r in views["rows"]}
    assert set(rows) == {"kd", "naive", "views"}
    assert [rows[n]["pairing"] for n in ("kd", "naive", "views")] == ["none", "naive", "replayed"]
    assert rows["views"]["views"] == 3 and rows["naive"]["views"] == 1
    assert rows["naive"]["augment"] == SHIFT and rows["views"]["augment"] == SHIFT
    assert rows["kd"]["augment"] is None
    # The plain cache stores 16-d float16 features the soft-label figure leaves out; the views
    # cache stores none, and its rows carry an 8-byte input hash.
    plain, viewed = rows["naive"], rows["views"]
    assert plain["bytes_per_view"] - plain["soft_bytes_per_view"] == 32
    assert viewed["soft_bytes_per_view"] == viewed["bytes_per_view"]
    assert viewed["soft_bytes_per_view"] - plain["soft_bytes_per_view"] == 8
    assert viewed["cache_bytes"] > plain["cache_bytes"] / 2 and viewed["teacher_seconds"] > 0
    assert views["best"] == {"none": "kd", "naive": "naive", "replayed": "views"}


def test_online_kd_against_a_cache_of_views_pays_one_forward_per_sample_and_epoch(job):
    cfg = ReportConfig(runs=str(job), agreement=False, plots=False)
    caches = {c["url"].rsplit("/", 1)[-1]: c for c in collect_report(cfg)["caches"]}
    saved = caches["views"]["time_saved"]
    t = saved["teacher_seconds"]
    # One student of 2 epochs; the cache ran 3 views of each sample: online KD would have
    # cost 2 / 3 of it, so the cache saved nothing (a negative saving, reported as such).
    assert saved["views"] == 3 and saved["online_seconds"] == pytest.approx((2 / 3 - 1) * t)
    assert caches["plain"]["time_saved"]["online_seconds"] == pytest.approx(
        (4 * 2 - 1) * caches["plain"]["teacher_seconds"]
    )


def test_report_md_has_the_table_and_the_comparison(job):
    cfg = ReportConfig(runs=str(job), agreement=False, plots=False)
    report(cfg)
    md = (job / "report.md").read_text()
    section = md.split("## Augmentation: soft labels of the view the student sees")[1]
    assert "| views | signal_1d | the same view (replayed) |" in section
    assert "| naive | signal_1d | the plain input (naive) |" in section
    assert "pts vs naive (naive," in section and "pts vs kd (no augmentation," in section
    assert "(48 samples x 3 views of `signal_1d`)" in md and "bytes/view" in md
    models = md.split("## The cache")[0]
    assert "| naive | ToyNet | KD + augmentation |" in models and "| kd | ToyNet | KD |" in models
