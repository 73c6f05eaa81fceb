"""The plain PyTorch loop example (pipeline/examples/kd_loop.py), run as a user runs it."""

from __future__ import annotations

from kdcache.pipeline.examples import kd_loop
from tests.conftest import LM_ROWS, LM_SMALL


def test_the_plain_loop_runs_and_its_loss_falls(lm_stores, capsys):
    args = [lm_stores["sampled"], "--data", "tests.toy_models:ToyTokens"]
    args += ["--data-arg", f"n={LM_ROWS}", "--student", "kdcache.pipeline.examples.lm:gpt2"]
    args += [a for p in [*LM_SMALL, "seed=1"] for a in ("--student-arg", p)]
    log = kd_loop.main([*args, "--steps", "30", "--lr", "1e-2", "--device", "cpu"])
    assert [r["step"] for r in log] == [10, 20, 30]
    assert all(r["kd"] > 0 and r["ce"] > 0 for r in log)
    assert log[-1]["loss"] < 0.95 * log[0]["loss"]
    for r in log:  # alpha 0.5: the loss is the mean of the two terms
        assert abs(r["loss"] - 0.5 * (r["kd"] + r["ce"])) < 1e-5
    assert capsys.readouterr().out.count("step ") == 3
