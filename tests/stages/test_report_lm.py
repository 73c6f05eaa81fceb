"""`kdcache report`'s language-model section on a real (tiny) LM job: a toy causal-LM teacher, a
sampled and a topk cache of it, a hard-label student and two cache students, plus an online-KD
student whose summary.json is written by hand (the online trainer lives on another branch)."""

from __future__ import annotations

import json
import math
import shutil

import matplotlib.image
import pytest
import torch
from click.testing import CliRunner

from kdcache.pipeline.cli import main
from kdcache.pipeline.jobs import collect_report as collect
from kdcache.pipeline.jobs import precompute, train
from kdcache.stages.precompute.run import PrecomputeConfig
from kdcache.stages.report.run import ReportConfig
from kdcache.stages.train.trainer import TrainConfig
from kdcache.storage.reader import CacheReader
from tests.stages.test_report import job  # noqa: F401 - the classifier job, for the joint report
from tests.toy_models import ToyCausalLM, ToyTokens

LM = "tests.toy_models:ToyCausalLM"
TOKENS = "tests.toy_models:ToyTokens"
EVAL = {"n": 10, "seed": 3}
STUDENT = {"dim": 8, "seed": 1}
ONLINE_TEACHER_SECONDS = 0.75


@pytest.fixture(scope="module")
def lm_job(tmp_path_factory):
    """RUNS/lm/{teacher, caches/{sampled,topk}, students/{hard,sampled,topk,online}}."""
    root = tmp_path_factory.mktemp("lmjob") / "runs"
    lm = root / "lm"
    common = dict(data=TOKENS, data_args={"n": 32}, eval_data=TOKENS, eval_data_args=EVAL)
    common.update(epochs=2, batch_size=8, device="cpu", quiet=True)
    train(TrainConfig(student=LM, task="causal-lm", out=str(lm / "teacher"), **common))
    for codec, options in (("sampled", {"samples": 20}), ("topk", {"top_k": 3})):
        precompute(
            PrecomputeConfig(
                task="causal-lm",
                teacher=LM,
                checkpoint=str(lm / "teacher" / "model.pt"),
                data=TOKENS,
                data_args={"n": 32},
                out=str(lm / "caches" / codec),
                codec=codec,
                codec_options=options,
                shard_rows=16,
                device="cpu",
                quiet=True,
            )
        )
    students = lm / "students"
    train(
        TrainConfig(
            student=LM, student_args=STUDENT, task="causal-lm", out=str(students / "hard"), **common
        )
    )
    for codec in ("sampled", "topk"):
        cache = str(lm / "caches" / codec)
        train(
            TrainConfig(
                student=LM, student_args=STUDENT, cache=cache, out=str(students / codec), **common
            )
        )
    # An online-KD student as the online trainer records it: a finished run (a copy of the
    # hard-label one, trained last) with the teacher it ran and the seconds its forwards took.
    shutil.copytree(students / "hard", students / "online")
    summary = json.loads((students / "online" / "summary.json").read_text())
    summary["name"] = "online"
    summary["online_teacher"] = {
        "spec": LM,
        "kwargs": {},
        "checkpoint": str(lm / "teacher" / "model.pt"),
    }
    summary["teacher_seconds"] = ONLINE_TEACHER_SECONDS
    summary["final"]["eval_loss"] -= 0.01
    summary["final"]["eval_perplexity"] = math.exp(summary["final"]["eval_loss"])
    (students / "online" / "summary.json").write_text(json.dumps(summary))
    return root


def _summary(root, name: str) -> dict:
    return json.loads((root / "lm" / "students" / name / "summary.json").read_text())


def _manifest(root, codec: str) -> dict:
    return json.loads((root / "lm" / "caches" / codec / "manifest.json").read_text())


def test_students_table_matches_the_runs(lm_job):
    result = CliRunner().invoke(main, ["report", "--runs", str(lm_job)])
    assert result.exit_code == 0, result.output
    doc = json.loads((lm_job / "report.json").read_text())
    assert doc["students"] == [] and doc["teacher"] is None  # no classifier job here
    lm = doc["lm"]
    assert [e["name"] for e in lm["students"]] == ["hard", "sampled", "topk", "online"]
    taught = {e["name"]: e["taught"] for e in lm["students"]}
    assert taught == {
        "hard": "hard labels",
        "sampled": "cache",
        "topk": "cache",
        "online": "teacher online",
    }
    for e in lm["students"]:
        s = _summary(lm_job, e["name"])
        assert e["eval_loss"] == s["final"]["eval_loss"]
        assert e["eval_perplexity"] == s["final"]["eval_perplexity"]
        assert e["epochs"] == 2 and e["train_seconds"] == s["train_seconds"]
        assert [c[1] for c in e["curve"]][:1] and len(e["curve"]) == 2
        if e["taught"] == "cache":
            m = _manifest(lm_job, e["name"])
            assert e["bytes_per_token"] == m["stats"]["bytes_per_token"]
            assert e["store_bytes"] == m["stats"]["total_bytes"]
            assert e["codec"] == e["name"]
            assert e["codec_label"] == CacheReader(e["cache"]).codec.label()
            assert e["cache_agreement"] == s["final"]["agreement"]
        else:
            assert e["bytes_per_token"] is None and e["cache"] is None
    t = json.loads((lm_job / "lm" / "teacher" / "summary.json").read_text())
    assert lm["teacher"]["eval_loss"] == t["final"]["eval_loss"]
    md = (lm_job / "report.md").read_text()
    assert "## Language model" in md and "Test accuracy" not in md
    for e in [lm["teacher"], *lm["students"]]:
        rows = md.replace("**", "").splitlines()
        row = next(line for line in rows if line.startswith(f"| {e['name']} |"))
        assert f"{e['eval_loss']:.4f}" in row and f"{e['eval_perplexity']:.2f}" in row
    assert "teacher online (tests.toy_models:ToyCausalLM)" in md
    assert "KL(teacher \\|\\| top-k + residual)" in md  # a "|" inside a cell is escaped
    assert "| hard |" in result.output and "Sampled-cache student sampled" in result.output


def test_agreement_is_recomputed_on_the_validation_tokens(lm_job):
    lm = collect(ReportConfig(runs=str(lm_job), plots=False))["lm"]
    data = ToyTokens(**EVAL)

    def top1(folder, **kwargs):
        net = ToyCausalLM(**kwargs).eval()
        net.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        with torch.no_grad():
            return torch.cat([net(data[i][None])[0].argmax(-1) for i in range(len(data))])

    teacher = top1(lm_job / "lm" / "teacher")
    for e in lm["students"]:
        mine = top1(lm_job / "lm" / "students" / e["name"], **STUDENT)
        assert e["agreement"] == pytest.approx(float((mine == teacher).double().mean()))
        assert e["agreement_on"] == "validation tokens"
    # Without the models only the cache students have the trainer's figure, marked as such.
    lm = collect(ReportConfig(runs=str(lm_job), plots=False, agreement=False))["lm"]
    on = {e["name"]: (e["agreement"] is not None, e["agreement_on"]) for e in lm["students"]}
    assert on["sampled"] == (True, "cached training tokens") and on["hard"] == (False, None)


def test_caches_table_and_time_saved(lm_job):
    lm = collect(ReportConfig(runs=str(lm_job), plots=False, agreement=False))["lm"]
    assert [c["codec"] for c in lm["caches"]] == ["sampled", "topk"]
    for c in lm["caches"]:
        m = _manifest(lm_job, c["codec"])
        stats, t = m["stats"], m["stats"]["teacher_seconds"]
        assert c["students"] == [c["codec"]] and c["epochs"] == 2
        assert c["bytes_per_token"] == stats["bytes_per_token"]
        assert c["tokens"] == stats["tokens"] and c["total_bytes"] == stats["total_bytes"]
        assert c["codec_error"] == CacheReader(c["url"]).codec.error_text(stats)
        assert c["teacher_seconds"] == t
        assert c["online_equivalent_seconds"] == pytest.approx(2 * t)
        assert c["saved_seconds"] == pytest.approx((2 - 1) * t)
        # The online student's measured seconds per epoch, times the cache students' epochs.
        assert c["online_measured_seconds"] == pytest.approx(ONLINE_TEACHER_SECONDS / 2 * 2)
    assert "mean total-variation distance" in lm["caches"][0]["codec_error"]
    assert "mean KL" in lm["caches"][1]["codec_error"]


def test_headline_states_the_measured_differences(lm_job):
    cfg = ReportConfig(
        runs=str(lm_job), plots=False, agreement=False, lm_near_online=0.02, lm_over_hard=0.05
    )
    lm = collect(cfg)["lm"]
    loss = {e["name"]: e["eval_loss"] for e in lm["students"]}
    h = lm["headline"]
    assert h["sampled_student"] == "sampled" and h["online_student"] == "online"
    assert h["matched_topk_student"] == "topk" and h["hard_student"] == "hard"
    assert h["best_cache_student"] == min(("sampled", "topk"), key=loss.get)
    assert h["sampled_minus_online"] == pytest.approx(loss["sampled"] - loss["online"])
    assert h["sampled_minus_matched_topk"] == pytest.approx(loss["sampled"] - loss["topk"])
    best = loss[h["best_cache_student"]]
    assert h["hard_minus_best_cache"] == pytest.approx(loss["hard"] - best)
    targets = list(h["targets"].values())
    assert targets == [
        loss["sampled"] - loss["online"] <= 0.02,
        loss["sampled"] < loss["topk"],
        loss["hard"] - best >= 0.05,
    ]
    from kdcache.stages.report.lm_text import headline

    text = headline(lm)
    assert f"{loss['sampled'] - loss['online']:+.4f} vs the online-KD student online" in text
    assert f"{loss['hard'] - best:+.4f} nats/token better" in text
    assert ("not met" in text) == (not all(targets))


def test_plots_are_images(lm_job):
    result = CliRunner().invoke(main, ["report", "--runs", str(lm_job), "--no-agreement"])
    assert result.exit_code == 0, result.output
    doc = json.loads((lm_job / "report.json").read_text())
    assert doc["lm"]["plots"] == ["lm_loss_vs_bytes.png", "lm_loss_curves.png"]
    assert doc["plots"] == []
    md = (lm_job / "report.md").read_text()
    for png in doc["lm"]["plots"]:
        assert f"]({png})" in md
        image = matplotlib.image.imread(str(lm_job / png))
        assert image.shape[0] > 300 and image.shape[1] > 500


def test_one_report_for_both_jobs(job, lm_job, tmp_path):  # noqa: F811 - the imported fixture
    root = tmp_path / "runs"
    shutil.copytree(job, root)
    shutil.copytree(lm_job / "lm", root / "lm")
    result = CliRunner().invoke(main, ["report", "--runs", str(root), "--no-agreement"])
    assert result.exit_code == 0, result.output
    doc = json.loads((root / "report.json").read_text())
    assert [s["name"] for s in doc["students"]] == ["hard", "kd", "feat"]
    assert len(doc["lm"]["students"]) == 4
    md = (root / "report.md").read_text()
    assert md.index("Test accuracy") < md.index("## Language model")
    assert doc["plots"] == ["accuracy_curves.png", "accuracy_bars.png"]
    # --lm elsewhere, or absent: the classifier report alone.
    result = CliRunner().invoke(
        main, ["report", "--runs", str(root), "--lm", str(tmp_path / "none"), "--no-plots"]
    )
    assert result.exit_code == 0, result.output
    assert "lm" not in json.loads((root / "report.json").read_text())
    assert "Language model" not in (root / "report.md").read_text()


def test_a_moved_cache_is_reported_not_fatal(lm_job, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(lm_job, root)
    path = root / "lm" / "students" / "topk" / "summary.json"
    summary = json.loads(path.read_text())
    summary["cache"] = str(tmp_path / "moved")
    path.write_text(json.dumps(summary))
    result = CliRunner().invoke(main, ["report", "--runs", str(root), "--no-agreement"])
    assert result.exit_code == 0, result.output
    lm = json.loads((root / "report.json").read_text())["lm"]
    topk = lm["caches"][1]
    assert topk["students"] == ["topk"] and "FormatError" in topk["error"]
    # Its student has no bytes/token, so there is no top-k student to match the sampled one.
    assert lm["headline"]["matched_topk_student"] is None
    assert lm["headline"]["targets"]["sampled better than matched topk"] is None
    md = (root / "report.md").read_text()
    assert "could not open it" in md and "no topk student to compare with" in md


def test_no_finished_student_in_either_job_is_a_usage_error(tmp_path):
    (tmp_path / "lm" / "students" / "half-done").mkdir(parents=True)
    result = CliRunner().invoke(main, ["report", "--runs", str(tmp_path)])
    assert result.exit_code == 2
    assert "no finished student" in result.output and f"{tmp_path}/lm/students" in result.output
    result = CliRunner().invoke(main, ["report", "--runs", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "nor --lm" in result.output
