"""`make run-lm` at toy size: the language-model job end to end, as `make run` drives it."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make"),
]

# Every size shrunk: the pipeline, not the quality, is under test here (the README has the real
# run). The tokenizer still trains offline, on a 300 kB prefix of the train split, and so does
# the teacher (LM_TEACHER=train): the committed one is for the real sizes (test_lm_teacher.py).
TINY = [
    "LM_VOCAB=512", "LM_BLOCK=16", "LM_TOKENS=6000", "LM_EVAL_TOKENS=1000",
    "LM_TOKENIZER_BYTES=300000", "LM_TEACHER=train", "LM_TEACHER_SIZE=n_layer=1 n_embd=16 n_head=2",
    "LM_TEACHER_TOKENS=6000", "LM_TEACHER_EPOCHS=2",
    "LM_STUDENT=n_layer=1 n_embd=8 n_head=2", "LM_SAMPLES=16", "LM_TOPK=16", "THREADS=1",
    "LM_THREADS=1",
]  # fmt: skip


def test_make_run_lm_writes_the_language_model_report(tmp_path):
    runs = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    done = subprocess.run(
        ["make", "-C", str(REPO), "run-lm", f"RUNS={runs}", *TINY],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((runs / "report.json").read_text())
    lm = report["lm"]
    names = {s["name"] for s in lm["students"]}
    assert names == {"hard", "kd-sampled", "kd-topk-matched", "kd-topk-large", "kd-online"}
    for s in lm["students"]:
        assert 0 < s["eval_loss"] < math.log(512) + 1, s  # sane: about uniform or better
    codecs = sorted(c["codec"] for c in lm["caches"])
    assert codecs == ["sampled", "topk", "topk"]
    sizes = {c["url"].rsplit("/", 1)[-1]: c["bytes_per_token"] for c in lm["caches"]}
    assert sizes["topk-matched"] == pytest.approx(sizes["sampled"], rel=0.15)
    assert sizes["topk-16"] > sizes["topk-matched"]
    assert set(lm["headline"]["targets"]) and (runs / "lm_loss_vs_bytes.png").stat().st_size
    md = (runs / "report.md").read_text()
    assert "kd-sampled" in md and "bytes/token" in md
    # a rerun with nothing to do is quick: every stage is a hit or already trained
    again = subprocess.run(
        ["make", "-C", str(REPO), "run-lm", f"RUNS={runs}", *TINY],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0 and again.stdout.count("already trained") == 5
