"""The LM job's teacher in the Makefile (dry runs): the committed checkpoint by default, trained
here with LM_TEACHER=train, and rebuilt into checkpoints/ by `make lm-teacher-checkpoint`."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO
from tests.test_makefile import make as dry_run
from tests.test_makefile import venv  # noqa: F401 - the fixture

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
RESTORE = "-m kdcache.pipeline.examples.lm_teacher restore --card checkpoints/lm-teacher.json"
TRAIN = "train --config configs/lm/teacher.toml"


def make(*args: str) -> str:
    """`make -n ARGS` with every run of blanks one space."""
    return re.sub(r"[ \t]+", " ", dry_run(*args))


def test_the_committed_teacher_is_restored_by_default_and_used_by_precompute(venv, tmp_path):  # noqa: F811
    out = make("lm-caches", f"VENV={venv}", f"RUNS={tmp_path}")
    assert RESTORE in out and TRAIN not in out
    assert f"--out {tmp_path}/lm/teacher --student-arg vocab_size=4096" in out
    assert f"--checkpoint {tmp_path}/lm/teacher/model.pt" in out  # precompute reads it


def test_lm_teacher_train_trains_it_here_on_its_own_tokens_with_one_thread(venv, tmp_path):  # noqa: F811
    out = make("lm-teacher", "LM_TEACHER=train", f"VENV={venv}", f"RUNS={tmp_path}")
    assert TRAIN in out and RESTORE not in out
    assert "--data-arg max_tokens=10000000" in out and "--threads 1" in out
    assert "OMP_NUM_THREADS=1" in out
    # Trained once: skipped while model.pt exists, unless that model.pt is a restored one.
    teacher = tmp_path / "lm" / "teacher"
    teacher.mkdir(parents=True)
    (teacher / "model.pt").write_bytes(b"")
    assert TRAIN not in make("lm-teacher", "LM_TEACHER=train", f"VENV={venv}", f"RUNS={tmp_path}")
    (teacher / "committed.json").write_text("{}")
    assert TRAIN in make("lm-teacher", "LM_TEACHER=train", f"VENV={venv}", f"RUNS={tmp_path}")


def test_lm_teacher_checkpoint_trains_then_exports(venv, tmp_path):  # noqa: F811
    out = make("lm-teacher-checkpoint", f"VENV={venv}", f"RUNS={tmp_path}")
    export = f"lm_teacher export --run {tmp_path}/lm/teacher --card checkpoints/lm-teacher.json"
    assert -1 < out.find(TRAIN) < out.find(export), out


def test_an_unknown_lm_teacher_is_one_line(venv, tmp_path):  # noqa: F811
    done = subprocess.run(
        ["make", "-C", str(REPO), "lm-teacher", "LM_TEACHER=n_layer=3", f"VENV={venv}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode != 0
    assert "LM_TEACHER=n_layer=3 is not one of committed, train" in done.stderr
