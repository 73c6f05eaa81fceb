"""`kill -9` (and SIGTERM) at every instrumented point of `kdcache train`, then the same command
again: the student's final weights and metrics must equal an uninterrupted run's.

One toy cache (48 rows, features) serves every case; the student trains 3 epochs of 6 batches
with the feature loss (a projector too), one torch thread in every process so that runs are
bitwise comparable. A [[students]] file of two students covers the points between students.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch

from kdcache.storage import faults
from tests.conftest import toy_precompute
from tests.faults.conftest import (
    exit_text,
    interrupt,
    invoke,
    last_line,
    run_with_fault,
    seen_after,
)
from tests.integration.conftest import toy_train_args

N = 48
EPOCHS, STEPS = 3, 6  # per student: 48 rows in batches of 8
EXTRA = ("--epochs", str(EPOCHS), "--batch-size", "8", "--threads", "1", "--quiet")
FEATURES = ("--beta", "0.5", "--student-features", "body")
TIMING = {"epoch_seconds", "samples_per_sec", "tokens_per_sec", "wall_seconds", "train_seconds"}

POINTS = [
    ("train.batch", 2, "mid-epoch 1"),
    ("train.epoch", 1, "after epoch 1, before its checkpoint"),
    ("write.checkpoint-1.pt", 1, "while writing a checkpoint (temporary written, not renamed)"),
    ("checkpoint.saved", 1, "checkpoint written, metrics.csv not yet"),
    ("train.batch", 9, "mid-epoch 2"),
    ("write.metrics.csv", 2, "while writing metrics.csv"),
    ("checkpoint.pruned", 3, "after the last checkpoint and its pruning"),
    ("write.model.pt", 1, "while writing model.pt"),
    ("train.model", 1, "model.pt written, summary.json not yet"),
    ("write.summary.json", 1, "while writing summary.json"),
    ("train.summary", 1, "right after summary.json"),
]
STUDENT_POINTS = [
    ("train.student", 1, "between the students of a [[students]] file"),
    ("train.batch", 21, "mid-epoch 1 of the second student"),
    ("write.checkpoint-2.pt", 2, "while writing the second student's checkpoint"),
]
TERM_POINTS = [("train.batch", 9), ("checkpoint.saved", 1), ("write.summary.json", 1)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "store"
    toy_precompute(out, data_args={"n": N}, features="body", top_k=3)
    return out


def train_args(cache, out, *more) -> list[str]:
    return toy_train_args(cache, out, N, *EXTRA, *FEATURES, *more)


def outcome(folder: Path) -> dict:
    """What a finished run leaves that must not depend on interruptions: weights, metrics, summary
    (timings removed)."""
    state = torch.load(io.BytesIO((folder / "model.pt").read_bytes()), weights_only=True)
    summary = json.loads((folder / "summary.json").read_text())
    drop = lambda d: {k: v for k, v in d.items() if k not in TIMING}  # noqa: E731
    rows = (folder / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    keep = [i for i, k in enumerate(header) if k not in TIMING]
    summary["settings"].pop("out")  # the folder itself differs between the runs compared
    return {
        "state": state,
        "summary": drop(summary),
        "metrics": [[line.split(",")[i] for i in keep] for line in rows],
        "files": sorted(p.name for p in folder.iterdir() if p.name != "tensorboard"),
    }


def assert_same(got: dict, want: dict) -> None:
    assert got["state"].keys() == want["state"].keys()
    for k in want["state"]:
        assert torch.equal(got["state"][k], want["state"][k]), k
    assert got["summary"] == want["summary"]
    assert got["metrics"] == want["metrics"]
    assert got["files"] == want["files"]  # no temporaries, old checkpoints pruned as usual


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "student"
    invoke(*train_args(cache, out))
    return outcome(out)


def left_behind(folder: Path) -> str:
    if (folder / "summary.json").exists():
        return "summary.json written (finished)"
    ckpts = sorted(p.name for p in folder.glob("checkpoint-*.pt"))
    return f"no summary.json; checkpoints {ckpts or 'none'}"


def epochs_left(folder: Path) -> int:
    """The epochs a rerun must still train in `folder`, from the files the kill left."""
    if (folder / "summary.json").exists():
        return 0
    done = [
        int(m[1]) for p in folder.glob("*") if (m := re.fullmatch(r"checkpoint-(\d+)\.pt", p.name))
    ]
    return EPOCHS - max(done, default=0)


def interrupted_then_rerun(args: list, fault: str, cli, folders: dict) -> tuple:
    """(the interrupted run, what it left in each folder, what the rerun did): every folder
    (name -> (path, reference outcome)) must end as its reference, and the rerun must have
    trained only the epochs the files left imply (its steps measured in faults.reached): a
    rerun that started over would end with the same weights, but fails here."""
    stopped = interrupt(args, fault)
    left = {name: left_behind(path) for name, (path, _) in folders.items()}
    todo = {name: epochs_left(path) for name, (path, _) in folders.items()}
    before = faults.reached.copy()
    res = cli(*args)
    ran = faults.reached - before
    assert res.exit_code == 0, res.stderr
    want = sum(todo.values())
    assert ran["train.epoch"] == want, f"rerun trained {ran['train.epoch']} epochs, not {want}"
    assert ran["train.batch"] == STEPS * want, f"rerun took {ran['train.batch']} steps"
    for path, reference in folders.values():
        assert_same(outcome(path), reference)
    did = {
        name: f"{EPOCHS - n} epoch(s) kept, {n} trained ({STEPS * n} steps, measured)"
        if n
        else "nothing left to train"
        for name, n in todo.items()
    }
    return stopped, left, did


@pytest.mark.parametrize(("point", "nth", "where"), POINTS, ids=[f"{p}:{n}" for p, n, _ in POINTS])
def test_kill_9_then_rerun_trains_the_same_student(
    tmp_path, cli, cache, reference, fault_row, point, nth, where
):
    out = tmp_path / "student"
    killed, left, lines = interrupted_then_rerun(
        train_args(cache, out), f"{point}:{nth}", cli, {"": (out, reference)}
    )
    fault_row(
        kind="kill -9: train",
        case=f"{point}:{nth}",
        fault=f"SIGKILL {where}",
        seen=seen_after(killed, left[""]),
        exit=exit_text(killed.returncode),
        recovery="rerun the same command: " + lines[""],
    )


@pytest.mark.parametrize(("point", "nth"), TERM_POINTS, ids=[f"{p}:{n}" for p, n in TERM_POINTS])
def test_sigterm_then_rerun_trains_the_same_student(
    tmp_path, cli, cache, reference, fault_row, point, nth
):
    out = tmp_path / "student"
    stopped, left, lines = interrupted_then_rerun(
        train_args(cache, out), f"{point}:{nth}:TERM", cli, {"": (out, reference)}
    )
    fault_row(
        kind="SIGTERM: train",
        case=f"{point}:{nth}",
        fault="SIGTERM at the point",
        seen=seen_after(stopped, left[""]),
        exit=exit_text(stopped.returncode),
        recovery="rerun the same command: " + lines[""],
    )


def test_the_campaign_catches_a_rerun_that_starts_over(
    tmp_path, cli, cache, reference, monkeypatch
):
    """The campaign's own test: a rerun that ignores its checkpoints retrains every epoch and,
    being deterministic, ends with the reference's weights and metrics; the measured steps fail
    it."""
    from kdcache.stages.train import checkpoint

    monkeypatch.setattr(checkpoint, "latest", lambda folder: None)
    out = tmp_path / "student"
    with pytest.raises(AssertionError, match=f"rerun trained {EPOCHS} epochs, not {EPOCHS - 1}"):
        interrupted_then_rerun(
            train_args(cache, out), "checkpoint.saved:1", cli, {"": (out, reference)}
        )
    assert_same(outcome(out), reference)  # what comparing the outcome alone would have accepted


STUDENTS = """
[[students]]
name = "a"
seed = 1

[[students]]
name = "b"
seed = 2
alpha = 0.5
"""


@pytest.fixture(scope="module")
def students_reference(cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("students-ref")
    (root / "students.toml").write_text(STUDENTS)
    invoke(*train_args(cache, root / "out", "--config", root / "students.toml"))
    return {name: outcome(root / "out" / name) for name in ("a", "b")}


@pytest.mark.parametrize(
    ("point", "nth", "where"), STUDENT_POINTS, ids=[f"{p}:{n}" for p, n, _ in STUDENT_POINTS]
)
def test_kill_9_in_a_students_file_then_rerun(
    tmp_path, cli, cache, students_reference, fault_row, point, nth, where
):
    (tmp_path / "students.toml").write_text(STUDENTS)
    out = tmp_path / "out"
    args = train_args(cache, out, "--config", tmp_path / "students.toml")
    folders = {n: (out / n, students_reference[n]) for n in ("a", "b")}
    killed, left, lines = interrupted_then_rerun(args, f"{point}:{nth}", cli, folders)
    state = f"a: {left['a']}; b: {left['b']}"
    fault_row(
        kind="kill -9: train",
        case=f"[[students]] {point}:{nth}",
        fault=f"SIGKILL {where}",
        seen=seen_after(killed, state),
        exit=exit_text(killed.returncode),
        recovery="rerun the same command: " + "; ".join(f"{n}: {t}" for n, t in lines.items()),
    )


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def test_sigterm_to_a_parallel_students_run_stops_its_children(
    tmp_path, cli, cache, students_reference, fault_row
):
    """--parallel 2 trains each student in a child process; SIGTERM to the parent (as a
    scheduler sends) must stop the children too, or they train on into the folders the rerun
    trains into."""
    (tmp_path / "students.toml").write_text(STUDENTS)
    out = tmp_path / "out"
    args = train_args(cache, out, "--config", tmp_path / "students.toml", "--parallel", "2")
    # The parent polls its children every 0.1 s: by the 5th poll they are starting up (a fresh
    # interpreter takes seconds), long before either can finish.
    stopped = run_with_fault([str(a) for a in args], "train.parallel:5:TERM")
    left = _processes_mentioning(str(out))
    assert stopped.returncode == 143, stopped.stderr
    assert left == []  # no child outlives the parent
    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    for name in ("a", "b"):
        assert_same(outcome(out / name), students_reference[name])
    fault_row(
        kind="SIGTERM: train",
        case="--parallel 2, SIGTERM to the parent",
        fault="SIGTERM to the parent while both children train",
        seen=f"{last_line(stopped.stderr)} (children stopped too: {len(left)} left running)",
        exit=exit_text(stopped.returncode),
        recovery="rerun the same command: both students equal a sequential run's",
    )
