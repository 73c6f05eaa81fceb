"""The Makefile's targets and variables (dry runs: `make -n`), the job configs, and .ci/run."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import time
import tomllib

import pytest

from kdcache.stages.train.config import TrainConfig
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
TARGETS = [
    "help",
    "run",
    "setup",
    "data",
    "teacher",
    "precompute",
    "students",
    "views-cache",
    "views-students",
    "report",
    "test",
    "test-quick",
    "faults",
    "lint",
    "bench",
    "cron",
    "clean",
    "distclean",
]


def make(*args: str) -> str:
    """`make -n ARGS` in the repository, continuation lines joined."""
    out = subprocess.run(
        ["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout
    return re.sub(r"\\\n\s*", " ", out)


@pytest.fixture
def venv(tmp_path):
    """A stand-in .venv whose setup stamp is newer than pyproject.toml: setup is up to date."""
    stamp = tmp_path / "venv" / ".kdcache-setup"
    stamp.parent.mkdir()
    stamp.touch()
    later = os.path.getmtime(REPO / "pyproject.toml") + 10
    os.utime(stamp, (later, later))
    return stamp.parent


def test_default_goal_lists_every_target():
    out = subprocess.run(["make", "-C", str(REPO)], capture_output=True, text=True, check=True)
    listed = re.findall(r"^  ([a-z-]+) ", out.stdout, re.M)
    assert set(TARGETS) <= set(listed)


def test_run_chains_the_stages_in_order(venv, tmp_path):
    out = make("run", f"VENV={venv}", f"RUNS={tmp_path}/r")
    assert "-m venv" not in out  # the stamp is fresh: no setup
    steps = [
        "mnist1d import MNIST1D",
        "kdcache train --config configs/teacher.toml",
        "kdcache precompute --teacher kdcache.pipeline.examples.models:TeacherCNN",
        "kdcache train --config configs/students.toml",
        "--views 8 --augment kdcache.pipeline.examples.augment:signal_1d",
        "kdcache train --config configs/views.toml --only mlp-kd-t4-views",
        f"kdcache report --runs {tmp_path}/r --out {tmp_path}/r/report.md",
    ]
    where = [out.find(s) for s in steps]
    assert -1 not in where and where == sorted(where), out


def test_variables_reach_the_commands(venv, tmp_path):
    r = f"{tmp_path}/r"
    args = ["precompute", "students", f"VENV={venv}", f"RUNS={r}", "TEMPERATURE=2", "TOPK=5"]
    out = make(*args, "EPOCHS=3", "DEVICE=cpu")
    assert f"--out {r}/cache/mnist1d-T2-k5 --codec topk --top-k 5 --temperature 2" in out
    assert f"--cache {r}/cache/mnist1d-T2-k5 --out {r}/students" in out
    assert "--epochs 3" in out and out.count("--device cpu") == 3  # teacher, precompute, students
    assert f"KDCACHE_DATA_DIR={r}/data" in out
    out = make(*args, "CACHE=s3://bucket/c")
    assert "--out s3://bucket/c " in out and "--cache s3://bucket/c " in out
    assert "--epochs" not in out  # no EPOCHS: each student keeps the epochs of its config


def test_faults_runs_the_fault_suite_then_renders_its_table(venv, tmp_path):
    out = make("faults", f"VENV={venv}", f"RUNS={tmp_path}/r")
    rows = f"{tmp_path}/r/faults.jsonl"
    run = (
        f"KDCACHE_FAULT_ROWS={rows} {venv}/bin/python -m pytest tests/faults -m 'slow or not slow'"
    )
    render = f"{venv}/bin/python -m tests.faults.render {rows} docs/RELIABILITY.md"
    assert f"rm -f {rows}" in out and -1 < out.find(run) < out.find(render), out


def test_teacher_is_skipped_once_its_model_exists(venv, tmp_path):
    assert "configs/teacher.toml" in make("teacher", f"VENV={venv}", f"RUNS={tmp_path}")
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "model.pt").write_bytes(b"")
    assert "configs/teacher.toml" not in make("teacher", f"VENV={venv}", f"RUNS={tmp_path}")


def test_setup_pins_torch_in_the_makefile_only(venv, tmp_path):
    out = make("setup", f"VENV={tmp_path}/fresh")
    assert f"python3 -m venv {tmp_path}/fresh" in out
    assert "pip install --quiet 'torch==2.13.0'" in out and "-e '.[dev,bench,lm]'" in out
    out = make("setup", f"VENV={tmp_path}/fresh", "TORCH_SPEC=torch>=2.5", "PYTHON=python3.12")
    assert "'torch>=2.5'" in out and "python3.12 -m venv" in out
    assert "pip install" not in make("setup", f"VENV={venv}")  # stamp newer than pyproject.toml
    os.utime(venv / ".kdcache-setup", (0, 0))
    assert "-m venv" in make("setup", f"VENV={venv}")  # pyproject.toml changed since: rerun
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(d.startswith("torch") and "==" in d for d in deps)


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)\n(.*?)```", readme, re.S).group(1)
    commands = [c.split("#")[0].strip() for c in block.splitlines() if c.split("#")[0].strip()]
    assert commands == ["make run", "make test"]
    ci = REPO / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    lines = [ln.strip() for ln in ci.read_text().splitlines()]
    assert [ln for ln in lines if ln and not ln.startswith("#")][-1] == commands[1]


def _config(doc: dict, **extra) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(doc) <= fields, f"unknown options: {set(doc) - fields}"
    cfg = TrainConfig(**{"out": "x", **doc, **extra})
    cfg.validate()
    return cfg


def test_job_configs_hold_a_baseline_and_distilled_students():
    teacher = tomllib.loads((REPO / "configs" / "teacher.toml").read_text())
    assert _config(teacher).student == "kdcache.pipeline.examples.models:TeacherCNN"
    doc = tomllib.loads((REPO / "configs" / "students.toml").read_text())
    shared = {k: v for k, v in doc.items() if k != "students"}
    students = [_config({**shared, **s}, cache="c") for s in doc["students"]]
    assert len(students) >= 4 and len({s.name for s in students}) == len(students)
    mlp = [s for s in students if s.student.endswith(":StudentMLP")]
    assert any(s.alpha == 0 and s.beta == 0 for s in mlp)  # the hard-label baseline
    assert len({s.temperature for s in mlp if s.alpha > 0 and s.beta == 0}) >= 2
    assert any(s.beta > 0 and s.student_features for s in students)
    assert {s.data_args["split"] for s in students} == {"train+transfer"}
    assert {s.eval_data_args["split"] for s in students} == {"test"}


def test_views_targets_make_the_views_cache_and_its_students(venv, tmp_path):
    r = f"{tmp_path}/r"
    out = " ".join(make("views-students", f"VENV={venv}", f"RUNS={r}", "VIEWS=4", "TOPK=5").split())
    shift = "kdcache.pipeline.examples.augment:signal_1d"
    assert f"--out {r}/cache/mnist1d-T4-k5-views4 " in out and f"--views 4 --augment {shift}" in out
    assert f"--only mlp-kd-t4-views --cache {r}/cache/mnist1d-T4-k5-views4 " in out
    assert f"--only mlp-kd-t4-naive --cache {r}/cache/mnist1d-T4-k5 --augment {shift}" in out
    assert "--features" in out  # the plain cache (the naive student's) is made too


def test_views_students_are_mlp_kd_t4_with_augmentation():
    """The comparison needs the same student: mlp-kd-t4 of students.toml is its no-augmentation
    twin, so every setting but the cache and --augment must equal it."""
    doc = tomllib.loads((REPO / "configs" / "students.toml").read_text())
    shared = {k: v for k, v in doc.items() if k != "students"}
    plain = [s for s in doc["students"] if s["name"] == "mlp-kd-t4"][0]
    twin = _config({**shared, **plain}, cache="c")
    views = tomllib.loads((REPO / "configs" / "views.toml").read_text())
    shared = {k: v for k, v in views.items() if k != "students"}
    names = [s["name"] for s in views["students"]]
    assert names == ["mlp-kd-t4-views", "mlp-kd-t4-naive"]
    for s in views["students"]:
        cfg = _config({**shared, **s}, cache="c")
        same = {"name", "out"}
        assert {k: v for k, v in vars(cfg).items() if k not in same} == {
            k: v for k, v in vars(twin).items() if k not in same
        }


def _cron(runs, inner: str, **popen) -> subprocess.Popen:
    """`make cron` for real, the job it wraps (`$(MAKE) run`) replaced by a shell command."""
    cmd = ["make", "-C", str(REPO), "cron", f"RUNS={runs}", f"MAKE=sh -c '{inner}' --"]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def test_cron_while_another_cron_runs_skips_with_exit_0(tmp_path):
    """README, Makefile and docs/scheduling.md agree: a second `make cron` exits 0 at once."""
    runs, started, stop, ran = (tmp_path / n for n in ("runs", "started", "stop", "ran"))
    first = _cron(runs, f"touch {started}; while [ ! -e {stop} ]; do sleep 0.05; done")
    try:
        deadline = time.time() + 30
        while not started.exists():
            assert first.poll() is None and time.time() < deadline, first.stdout.read()
            time.sleep(0.05)
        second = _cron(runs, f"touch {ran}")
        out = second.communicate(timeout=30)[0]
        assert second.returncode == 0, out
        assert f"make cron: another run holds {runs}/.make.lock; skipped" in out
        assert not ran.exists()  # the job did not run twice
    finally:
        stop.touch()
        first.communicate(timeout=30)
    assert first.returncode == 0
    third = _cron(runs, f"touch {ran}")  # the lock is free again: the job runs
    assert third.communicate(timeout=30) and third.returncode == 0 and ran.exists()
    failed = _cron(runs, "exit 3")  # a failing job is not hidden (make reports any as 2)
    assert "Error 3" in failed.communicate(timeout=30)[0] and failed.returncode == 2
