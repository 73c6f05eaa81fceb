"""`kdcache evaluate --checkpoint` on a run folder, a bare model.pt (+ --student) or a trainer's
checkpoint-N.pt, and its --deploy figures."""

from __future__ import annotations

import json

import pytest

from kdcache.pipeline.jobs import train
from kdcache.stages.train.trainer import TrainConfig
from tests.conftest import assert_one_line_error

STUDENT, DATA = "tests.toy_models:ToyNet", "tests.toy_models:ToyData"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "student"
    train(
        TrainConfig(
            student=STUDENT, student_args={"dim": 8, "seed": 2}, data=DATA, data_args={"n": 64},
            out=str(out), epochs=2, batch_size=16, device="cpu", quiet=True,
        )
    )  # fmt: skip
    return out


def evaluate(cli, checkpoint, *extra):
    res = cli("evaluate", "--checkpoint", checkpoint, "--data", DATA, "--data-arg", "n=50",
              "--device", "cpu", "--json", *extra)  # fmt: skip
    return res, json.loads(res.stdout) if res.exit_code == 0 else None


def test_a_bare_model_file_or_checkpoint_scores_as_its_run_folder(cli, run_dir):
    _, folder = evaluate(cli, run_dir)
    _, bare = evaluate(cli, run_dir / "model.pt", "--student", STUDENT, "--student-arg", "dim=8")
    # checkpoint-2.pt records its run's settings: no --student needed.
    _, ckpt = evaluate(cli, run_dir / "checkpoint-2.pt")
    for got in (bare, ckpt):
        for key in ("n", "accuracy", "loss", "ece"):
            assert got[key] == pytest.approx(folder[key], abs=1e-12), key
    assert (bare["name"], ckpt["name"], folder["name"]) == (
        "model.pt",
        "checkpoint-2.pt",
        "student",
    )
    assert ckpt["student"] == STUDENT
    # An older epoch's weights differ from the final ones.
    _, first = evaluate(cli, run_dir / "checkpoint-1.pt")
    assert first["loss"] != pytest.approx(folder["loss"], abs=1e-9)


def test_wrong_combinations_are_one_line_errors(cli, run_dir):
    res, _ = evaluate(cli, run_dir / "model.pt")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "model.pt", "state dict", "--student SPEC")
    res, _ = evaluate(cli, run_dir, "--student", STUDENT)
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "--student", "run folder", "model.pt")
    res, _ = evaluate(cli, run_dir / "model.pt", "--student", STUDENT)  # dim 16: does not fit
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "does not fit")
    res, _ = evaluate(cli, run_dir / "nothing.pt", "--student", STUDENT)
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "nothing.pt", "does not exist")


def test_deploy_figures_in_json_and_text(cli, run_dir):
    _, got = evaluate(cli, run_dir, "--deploy")
    d = got["deploy"]
    assert d["params"] == json.loads((run_dir / "summary.json").read_text())["num_params"]
    assert d["weight_bytes"] == (run_dir / "model.pt").stat().st_size
    assert d["latency_b1"] > 0 and d["int8"]["latency_b256"] > 0
    assert d["int8"]["accuracy"] == pytest.approx(got["accuracy"], abs=0.1)
    _, plain = evaluate(cli, run_dir)
    assert "deploy" not in plain  # only when asked: timing takes seconds
    res = cli("evaluate", "--checkpoint", run_dir, "--data", DATA, "--data-arg", "n=50",
              "--device", "cpu", "--deploy")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.startswith("float32") and "ms at batch 1" in line for line in lines)
    assert any(line.startswith("int8") and "accuracy" in line for line in lines)


def test_a_language_models_weights_file_with_its_task(cli, tmp_path):
    import torch

    from kdcache.stages.tasks.causal_lm import perplexity
    from tests.toy_models import ToyCausalLM

    torch.save(ToyCausalLM(seed=3).state_dict(), tmp_path / "lm.pt")
    res = cli("evaluate", "--checkpoint", tmp_path / "lm.pt", "--student",
              "tests.toy_models:ToyCausalLM", "--task", "causal-lm",
              "--data", "tests.toy_models:ToyTokens", "--device", "cpu", "--json")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["perplexity"] == pytest.approx(perplexity(got["loss"]))
    assert got["loss"] > 0 and got["n"] > 24  # per token, not per block
