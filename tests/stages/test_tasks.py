"""The task registry and the configs resolved once: every problem reported at once, the user's
config never changed, a task's defaults taken from the task object (not its name)."""

from __future__ import annotations

import dataclasses

import pytest

from kdcache.stages import tasks
from kdcache.stages.precompute.config import PrecomputeConfig
from kdcache.stages.tasks.base import Task
from kdcache.stages.train.config import TrainConfig
from kdcache.stages.train.run_log import CSV_FIELDS
from kdcache.stages.train.setup import resolve
from kdcache.storage.errors import UsageError


def test_registry_knows_the_built_in_tasks_and_names_them_on_a_miss():
    assert set(tasks.names()) == {"classification", "regression", "causal-lm"}
    assert tasks.get(None) is tasks.get("classification")
    assert tasks.get("causal-lm").per_token and not tasks.get("regression").tempered
    with pytest.raises(UsageError, match="unknown task 'vision'.*classification"):
        tasks.get("vision")


def test_every_task_implements_the_interface():
    for task in tasks.every():
        for name, member in vars(Task).items():
            if callable(member) and not name.startswith("_"):
                assert callable(getattr(task, name)), (task.name, name)
        assert set(task.row_fields) <= set(CSV_FIELDS)  # metrics.csv keeps its columns
        assert task.best[1] in (1, -1)


def test_a_precompute_config_reports_every_problem_in_one_line():
    cfg = PrecomputeConfig(data="d", out="o", batch_size=0, task="causal-lm", augment="a:b")
    with pytest.raises(UsageError) as err:
        cfg.validate()
    text = str(err.value)
    assert "\n" not in text and text.startswith("3 problems with the settings: (1) ")
    for needle in ("--batch-size 0", "--teacher SPEC", "views of token blocks"):
        assert needle in text


def test_resolved_fills_defaults_in_a_new_config_and_leaves_the_given_one():
    cfg = PrecomputeConfig(teacher="t:T", data="d", out="o", task="regression", temperature=3.0)
    got = cfg.resolved()
    assert (got.codec, got.temperature) == ("dense", 1.0)  # raw outputs: nothing to temper
    assert (cfg.codec, cfg.temperature) == (None, 3.0)
    lm = PrecomputeConfig(teacher="t:T", data="d", out="o", task="causal-lm").resolved()
    assert (lm.codec, lm.temperature) == ("sampled", 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.codec = "topk"


def test_a_train_config_resolves_once_without_a_cache():
    cfg = TrainConfig(student="s:S", data="d", out="runs/a/", teacher="t:T", task="causal-lm")
    got = resolve(cfg, None)
    assert (got.name, got.alpha, got.temperature) == ("a", 0.9, 1.0)  # online: the task's T
    assert (cfg.name, cfg.alpha, cfg.temperature) == (None, None, None)
    assert resolve(got, None) == got  # resolving a resolved config changes nothing
    both = TrainConfig(student="s:S", data="d", out="o", task="regression", beta=1.0)
    with pytest.raises(UsageError, match=r"^3 problems.*--beta > 0 needs --cache.*--task "
                       r"regression needs --cache.*--student-features"):  # fmt: skip
        resolve(both, None)
