"""What each shard records of the conditions it was computed under, and the resume warning."""

from __future__ import annotations

import json
import logging

import torch

from kdcache.stages.precompute.conditions import conditions, differences, warn_if_resumed_elsewhere
from tests.conftest import toy_precompute


def test_markers_and_manifest_record_the_conditions(tmp_path):
    toy_precompute(tmp_path / "s", threads=1, batch_size=8)
    markers = [json.loads(p.read_text()) for p in sorted((tmp_path / "s/_commits").glob("*"))]
    want = {
        "device": "cpu",
        "threads": 1,
        "torch": torch.__version__,
        "precision": "fp32",
        "batch_size": 8,
    }
    assert len(markers) == 4
    for m in markers:
        assert {k: m["conditions"][k] for k in want} == want
    manifest = json.loads((tmp_path / "s/manifest.json").read_text())
    assert manifest["conditions"] == [markers[0]["conditions"]]  # one run: one set


def test_the_thread_count_is_set_for_the_job_and_restored(tmp_path):
    before = torch.get_num_threads()
    toy_precompute(tmp_path / "s", threads=before + 1)
    marker = json.loads((tmp_path / "s/_commits/part-00000.json").read_text())
    assert marker["conditions"]["threads"] == before + 1
    assert torch.get_num_threads() == before


def test_differences_name_each_changed_condition():
    old = conditions(torch.device("cpu"), "fp32", 8) | {"threads": 1}
    new = old | {"threads": 2, "batch_size": 16}
    assert differences(old, new) == ["batch_size 8 -> 16", "threads 1 -> 2"]
    assert differences(old, dict(old)) == []
    assert differences({"device": "cpu"}, {"device": "cpu", "cuda": "12.6"}) == ["cuda ? -> 12.6"]


def test_one_warning_line_names_every_difference_and_the_flags_that_undo_them(caplog):
    now = {"device": "cpu", "threads": 2, "batch_size": 16}
    recorded = {0: now | {"threads": 1}, 1: now | {"threads": 1, "batch_size": 8}, 2: now}
    with caplog.at_level(logging.WARNING, "kdcache.precompute"):
        got = warn_if_resumed_elsewhere("/s", recorded, now)
    assert got == ["threads 1 -> 2", "batch_size 8 -> 16"]
    [record] = caplog.records
    text = record.getMessage()
    assert "\n" not in text and "its 3 committed shard(s)" in text
    assert text.endswith("rerun with --threads 1 --batch-size 8 to keep it identical")


def test_no_warning_under_the_same_conditions_or_without_committed_shards(caplog):
    now = {"device": "cpu", "threads": 1}
    with caplog.at_level(logging.WARNING, "kdcache.precompute"):
        assert warn_if_resumed_elsewhere("/s", {0: dict(now), 1: dict(now)}, now) == []
        assert warn_if_resumed_elsewhere("/s", {}, now) == []
    assert caplog.records == []


def test_shards_of_an_older_kdcache_recorded_nothing_and_that_is_said(caplog):
    with caplog.at_level(logging.WARNING, "kdcache.precompute"):
        got = warn_if_resumed_elsewhere("/s", {0: None, 1: None}, {"device": "cpu"})
    assert got == ["2 shard(s) recorded no conditions"]
    assert "rerun with" not in caplog.records[0].getMessage()  # no flag restores an old version
