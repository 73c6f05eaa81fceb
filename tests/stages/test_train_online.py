"""Online KD (`kdcache train --teacher`, no --cache): the soft term against the live teacher equals
the dense KL by hand and a dense cache's loss of the same teacher; refusals; resume; summary."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from kdcache.pipeline import jobs
from kdcache.pipeline.runtime import Dist
from kdcache.stages.tasks import causal_lm as lm
from kdcache.stages.train.run_log import parse_csv
from kdcache.stages.train.trainer import TrainConfig, Trainer
from kdcache.storage.errors import UsageError
from tests.conftest import assert_one_line_error, toy_precompute
from tests.toy_models import ToyCausalLM, ToyNet

N = 128
NET, LM = "tests.toy_models:ToyNet", "tests.toy_models:ToyCausalLM"
DATA, TOKENS = "tests.toy_models:ToyData", "tests.toy_models:ToyTokens"
KINDS = {
    "classification": dict(
        teacher=NET, student=NET, student_args={"dim": 8, "seed": 1}, data=DATA,
        data_args={"n": N},
    ),
    "causal-lm": dict(
        teacher=LM, student=LM, student_args={"dim": 8, "seed": 1}, data=TOKENS,
        data_args={"n": 24}, task="causal-lm",
    ),
}  # fmt: skip


def config(out, kind="classification", **overrides) -> TrainConfig:
    fields = dict(
        out=str(out), epochs=2, batch_size=16, lr=1e-2, device="cpu", quiet=True, buffer_size=32
    )
    return TrainConfig(**(fields | KINDS[kind] | overrides))


def build(cfg: TrainConfig) -> Trainer:
    t = jobs.trainer(cfg, Dist())
    assert isinstance(t, Trainer)
    t.setup()
    return t


def first_batch(trainer: Trainer) -> tuple[dict, torch.Tensor]:
    trainer.stream.set_epoch(1)
    batch = next(iter(trainer.stream))
    with torch.no_grad():
        return batch, trainer.task.logits(trainer.student, batch["input"])


def dense_kl(z_teacher: torch.Tensor, z_student: torch.Tensor, T: float) -> float:
    """``T^2 * mean KL(softmax(z_t / T) || softmax(z_s / T))`` in float64, by hand."""
    p = F.softmax(z_teacher.double() / T, -1)
    log_q = F.log_softmax(z_student.double() / T, -1)
    return float((p * (p.log() - log_q)).sum(-1).mean() * T**2)


@pytest.mark.parametrize("T", [None, 2.0])
def test_classifier_soft_loss_is_the_dense_kl_to_the_live_teacher(tmp_path, T):
    trainer = build(config(tmp_path / "o", temperature=T, alpha=0.7))
    assert trainer.cfg.temperature == (T or 4.0)  # no store to take T from: the default
    batch, z = first_batch(trainer)
    terms = trainer.loss_terms(z, None, batch)
    with torch.no_grad():
        want = dense_kl(ToyNet().eval()(batch["input"]), z, T or 4.0)
    assert float(terms["soft_loss"]) == pytest.approx(want, abs=1e-6)
    assert want > 0.01  # the student is not the teacher: the comparison means something
    total = 0.7 * terms["soft_loss"] + 0.3 * terms["hard_loss"]
    assert float(terms["loss"]) == pytest.approx(float(total), abs=1e-6)
    assert trainer.online.seconds > 0


def test_causal_lm_soft_loss_is_the_dense_kl_per_valid_token(tmp_path):
    trainer = build(config(tmp_path / "o", "causal-lm", data_args={"n": 24, "masked": True}))
    assert trainer.cfg.temperature == 1.0
    batch, z = first_batch(trainer)
    x = batch["input"]
    mask = x["attention_mask"].bool()
    assert not bool(mask.all())  # padding and masked tails are in the batch, and left out
    terms = trainer.loss_terms(z, None, batch)
    with torch.no_grad():
        zt = ToyCausalLM().eval()(x["input_ids"])
    assert float(terms["soft_loss"]) == pytest.approx(dense_kl(zt[mask], z[mask], 1.0), abs=1e-6)
    hard = lm.next_token_loss(z, x["input_ids"], x["attention_mask"])
    assert float(terms["hard_loss"]) == pytest.approx(float(hard), abs=1e-6)


@pytest.mark.parametrize(("kind", "dtype", "tol"), [
    ("classification", "float32", 1e-5), ("classification", "float16", 2e-3),
    ("causal-lm", "float32", 1e-5), ("causal-lm", "float16", 2e-3),
])  # fmt: skip
def test_online_equals_a_dense_cache_of_the_same_teacher(tmp_path, kind, dtype, tol):
    k = KINDS[kind]
    store = tmp_path / "dense"
    task = {"task": kind} if kind == "causal-lm" else {}
    toy_precompute(
        store, teacher=k["teacher"], data=k["data"], data_args=k["data_args"], codec="dense",
        dtype=dtype, temperature=2.0, **task,
    )  # fmt: skip
    cached = build(config(tmp_path / "c", kind, teacher=None, cache=str(store), alpha=1.0))
    online = build(config(tmp_path / "o", kind, temperature=2.0, alpha=1.0))
    # The teacher is built before the student's seed: both students start from the same weights.
    for a, b in zip(cached.student.parameters(), online.student.parameters(), strict=True):
        assert torch.equal(a, b)
    batch, z = first_batch(cached)
    want = float(cached.loss_terms(z, None, batch)["loss"])
    assert float(online.loss_terms(z, None, batch)["loss"]) == pytest.approx(want, abs=tol)
    assert want > 0.01


@pytest.mark.parametrize(("overrides", "needles"), [
    ({"cache": "some/store"}, ("--teacher", "--cache", "not both")),
    ({"beta": 0.5, "student_features": "body"}, ("--beta 0.5", "online", "--beta 0")),
    ({"student_args": {"num_classes": 5}}, ("--teacher", "outputs 10", "5")),
    ({"teacher_args": {"num_classes": 5}}, ("--teacher", "outputs 5", "10")),
])  # fmt: skip
def test_refusals(tmp_path, overrides, needles):
    out = tmp_path / "o"
    with pytest.raises(UsageError) as err:
        jobs.train(config(out, **overrides))
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert not out.exists() or not list(out.iterdir())


def test_a_language_model_teacher_needs_task_causal_lm(tmp_path):
    data = {"n": 24, "min_len": 6, "max_len": 6}  # equal lengths: the rows stack as samples
    cfg = config(tmp_path / "o", "causal-lm", task=None, data_args=data)
    with pytest.raises(UsageError, match="--task causal-lm"):
        jobs.train(cfg)


def test_summary_resume_and_another_teacher_refused(tmp_path):
    jobs.train(config(tmp_path / "whole"))
    out = tmp_path / "o"
    assert jobs.train(config(out), stop_after_epoch=1)["status"] == "stopped"
    summary = jobs.train(config(out))["summary"]  # resumes from checkpoint-1.pt
    rows = json.loads((out / "summary.json").read_text())
    assert rows == summary
    assert summary["online_teacher"]["spec"] == NET
    assert (
        summary["online_teacher"]["kwargs"] == {}
        and summary["online_teacher"]["checkpoint"] is None
    )
    assert summary["teacher_seconds"] > 0 and summary["settings"]["teacher"] == NET
    assert summary["settings"]["temperature"] == 4.0
    curve = [parse_csv((f / "metrics.csv").read_text()) for f in (tmp_path / "whole", out)]
    assert [r["loss"] for r in curve[1]] == pytest.approx([r["loss"] for r in curve[0]])
    assert jobs.train(config(out))["status"] == "done-before"
    with pytest.raises(UsageError, match="teacher_args"):
        jobs.train(config(out, teacher_args={"seed": 3}))


def test_online_and_hard_students_through_the_cli(tmp_path, cli):
    toml = tmp_path / "students.toml"
    toml.write_text(
        f'student = "{LM}"\nstudent_args = {{dim = 8, seed = 1}}\ndata = "{TOKENS}"\n'
        'data_args = {n = 24}\ntask = "causal-lm"\nepochs = 1\nbatch_size = 8\ndevice = "cpu"\n'
        f'[[students]]\nname = "online"\nteacher = "{LM}"\nalpha = 1.0\n'
        '[[students]]\nname = "hard"\n'
    )
    res = cli("train", "--config", toml, "--out", tmp_path / "out", "--quiet")
    assert res.exit_code == 0, res.stderr
    online = json.loads((tmp_path / "out" / "online" / "summary.json").read_text())
    hard = json.loads((tmp_path / "out" / "hard" / "summary.json").read_text())
    assert online["teacher_seconds"] > 0 and online["settings"]["temperature"] == 1.0
    assert hard["teacher_seconds"] is None and hard["online_teacher"] is None
    res = cli(
        "train", "--teacher", NET, "--cache", tmp_path / "store", "--student", NET,
        "--data", DATA, "--out", tmp_path / "x",
    )  # fmt: skip
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "--teacher", "--cache")


def test_teacher_checkpoint_weights_are_the_teacher(tmp_path):
    weights = tmp_path / "teacher.pt"
    torch.save(ToyNet(seed=3).state_dict(), weights)
    trainer = build(config(tmp_path / "o", teacher_checkpoint=str(weights)))
    batch, z = first_batch(trainer)
    with torch.no_grad():
        want = dense_kl(ToyNet(seed=3).eval()(batch["input"]), z, 4.0)
    assert float(trainer.loss_terms(z, None, batch)["soft_loss"]) == pytest.approx(want, abs=1e-6)
    assert trainer.online.identity["checkpoint"] == str(weights)
    assert trainer.online.identity["weights_sha256"]
