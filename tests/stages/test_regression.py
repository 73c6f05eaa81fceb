"""Regression distillation: stored targets, the two-term loss, its metrics, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kdcache.pipeline import jobs
from kdcache.pipeline.jobs import train as run
from kdcache.pipeline.models import load_model
from kdcache.pipeline.runtime import Dist
from kdcache.stages.evaluate.config import EvaluateConfig
from kdcache.stages.tasks import regression_metrics
from kdcache.stages.train.run_log import epoch_line, parse_csv
from kdcache.stages.train.trainer import TrainConfig
from kdcache.storage.errors import UsageError
from kdcache.storage.reader import CacheReader
from tests.conftest import REPO, toy_precompute
from tests.toy_models import LinearReg, RegData

N = 96
DATA = {"n": N, "every_missing": 3}  # a third of the targets missing


def reg_precompute(out, data_args=None, **kw):
    fields = dict(
        teacher="tests.toy_models:LinearReg",
        task="regression",
        dtype="float32",
        data="tests.toy_models:RegData",
        data_args=data_args or DATA,
        shard_rows=32,
        batch_size=16,
    )
    return toy_precompute(out, **(fields | kw))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("reg") / "cache"
    reg_precompute(out)
    return str(out)


def config(out, cache, **overrides) -> TrainConfig:
    fields = dict(
        student="tests.toy_models:LinearReg",
        student_args={"seed": 1},
        data="tests.toy_models:RegData",
        data_args=DATA,
        eval_data="tests.toy_models:RegData",
        eval_data_args={"n": 64, "seed": 5},
        out=str(out),
        cache=cache,
        epochs=2,
        batch_size=32,
        lr=1e-2,
        device="cpu",
        quiet=True,
        buffer_size=32,
    )
    return TrainConfig(**(fields | overrides))


def teacher_outputs(x) -> torch.Tensor:
    with torch.no_grad():
        return LinearReg().eval()(torch.as_tensor(x)).double()


def test_store_keeps_targets_nulls_and_their_statistics(cache):
    r = CacheReader(cache)
    data = RegData(**DATA)
    cols = [r.read_shard(i) for i in range(len(r.shards))]
    ids = np.concatenate([c["sample_id"] for c in cols])
    got = np.concatenate([c["target"] for c in cols])
    missing = ids % 3 == 0
    assert np.isnan(got[missing]).all() and not np.isnan(got[~missing]).any()
    np.testing.assert_array_equal(got[~missing], data.y[ids[~missing]])
    assert r.verify() == [] and r.targets_info == {"dtype": "float32", "width": 2}
    y, stats = data.y[~(np.arange(N) % 3 == 0)].astype(np.float64), r.manifest["stats"]
    assert stats["target_rows"] == len(y) == r.target_rows
    np.testing.assert_allclose(stats["target_mean"], y.mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats["target_std"], y.std(0), rtol=1e-7)
    err = teacher_outputs(data.x[~(np.arange(N) % 3 == 0)]).numpy() - y
    assert stats["teacher_mse"] == pytest.approx((err**2).mean(), rel=1e-6)
    assert stats["teacher_mae"] == pytest.approx(np.abs(err).mean(), rel=1e-6)
    # Nulls in the file, not NaN: any Parquet reader sees a missing target as missing.
    table = r.shard_table(0)
    assert table.column("target").null_count == int(
        (table.column("sample_id").to_numpy() % 3 == 0).sum()
    )


@pytest.mark.parametrize("normalize", [False, True])
def test_loss_is_alpha_mse_teacher_plus_masked_mse_targets(tmp_path, cache, normalize):
    cfg = config(tmp_path / "o", cache, alpha=0.3, normalize_targets=normalize)
    trainer = jobs.trainer(cfg, Dist())
    trainer.setup()
    trainer.stream.set_epoch(1)
    batch = next(iter(trainer.stream))
    with torch.no_grad():
        z = trainer.student(batch["input"])
    terms = trainer.loss_terms(z, None, batch)
    zd, y = z.double(), torch.from_numpy(RegData(**DATA).y[batch["sample_id"].numpy()]).double()
    has = batch["sample_id"] % 3 != 0
    w = 1 / torch.tensor(CacheReader(cache).manifest["stats"]["target_std"]) ** 2
    w = w if normalize else torch.ones(2)
    soft = ((zd - teacher_outputs(batch["input"])) ** 2 * w).mean()
    hard = ((zd[has] - y[has]) ** 2 * w).mean()
    assert 0 < int(has.sum()) < len(has)  # the batch mixes rows with and without a target
    assert float(terms["soft_loss"]) == pytest.approx(float(soft), rel=1e-5)
    assert float(terms["hard_loss"]) == pytest.approx(float(hard), rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(0.3 * float(soft) + 0.7 * float(hard), rel=1e-5)


def _weights(model) -> np.ndarray:
    return torch.cat([model.head.weight.T, model.head.bias[None]]).detach().numpy()


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_student_converges_to_the_teacher_or_to_least_squares(tmp_path, cache, alpha):
    """alpha = 1: a linear student becomes the linear teacher; alpha = 0: it becomes the
    least-squares fit of the rows with targets (which the teacher is not)."""
    cfg = config(tmp_path / "o", cache, alpha=alpha, epochs=60, lr=0.1, warmup=0.0)
    result = run(cfg)
    model, _ = load_model(cfg.student, cfg.student_args, f"{cfg.out}/model.pt", None, "--student")
    data = RegData(**DATA)
    keep = np.arange(N) % 3 != 0
    xb = np.hstack([data.x[keep], np.ones((keep.sum(), 1))])
    least_squares = np.linalg.lstsq(xb, data.y[keep], rcond=None)[0]
    want = _weights(LinearReg()) if alpha == 1 else least_squares
    np.testing.assert_allclose(_weights(model), want, atol=0.02)
    assert np.abs(_weights(LinearReg()) - least_squares).max() > 0.5  # the two ends differ
    final = result["summary"]["final"]
    if alpha == 1:
        assert final["teacher_mse"] < 1e-3 and final["teacher_r2"] > 0.999
    else:
        assert final["eval_r2"] > 0.99  # targets are a linear map of x plus 0.1 noise


def test_metrics_in_rows_summary_csv_log_and_evaluate(tmp_path, cache):
    cfg = config(tmp_path / "o", cache, epochs=3)
    result = run(cfg)
    rows, summary = result["rows"], result["summary"]
    # The default, with targets, in the run's resolved settings; the user's config is untouched.
    assert cfg.alpha is None and summary["settings"]["alpha"] == 0.9
    assert all(r["eval_accuracy"] is None and r["eval_mse"] > 0 for r in rows)
    best = min(rows, key=lambda r: r["eval_mse"])
    assert (
        summary["best"]["epoch"] == best["epoch"]
        and summary["final"]["eval_r2"] == rows[-1]["eval_r2"]
    )
    csv_rows = parse_csv((tmp_path / "o" / "metrics.csv").read_text())
    assert [r["eval_mae"] for r in csv_rows] == pytest.approx([r["eval_mae"] for r in rows])
    line = epoch_line(rows[-1], 3, "regression")
    assert "eval_mse" in line and "teacher_r2" in line and "eval_accuracy" not in line
    # The student's metrics by hand on the eval data, and `kdcache evaluate` agreeing.
    model, _ = load_model(cfg.student, cfg.student_args, f"{cfg.out}/model.pt", None, "--student")
    ev = RegData(n=64, seed=5)
    with torch.no_grad():
        p = model(torch.from_numpy(ev.x)).double().numpy()
    err = p - ev.y
    r2 = np.mean(1 - (err**2).sum(0) / ((ev.y - ev.y.mean(0)) ** 2).sum(0))
    assert rows[-1]["eval_mse"] == pytest.approx((err**2).mean(), rel=1e-6)
    assert rows[-1]["eval_mae"] == pytest.approx(np.abs(err).mean(), rel=1e-6)
    assert rows[-1]["eval_r2"] == pytest.approx(r2, abs=1e-6)
    out = jobs.evaluate(
        EvaluateConfig(
            checkpoint=cfg.out, data="tests.toy_models:RegData", data_args={"n": 64, "seed": 5},
            cache=cache, device="cpu",
        )
    )  # fmt: skip
    assert out["n"] == 64 and out["mse"] == pytest.approx(rows[-1]["eval_mse"], rel=1e-9)
    assert out["teacher_mse"] == pytest.approx(rows[-1]["teacher_mse"], rel=1e-9)
    t = teacher_outputs(RegData(**DATA).x).numpy()
    with torch.no_grad():
        pt = model(torch.from_numpy(RegData(**DATA).x)).double().numpy()
    assert out["teacher_mse"] == pytest.approx(((pt - t) ** 2).mean(), rel=1e-5)


def test_summed_metric_vectors_match_sklearn():
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    rng = np.random.default_rng(0)
    y, p = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    y[::7] = np.nan  # missing targets are left out
    keep = ~np.isnan(y).any(1)
    parts = [
        regression_metrics.batch_sums(
            torch.from_numpy(p[a : a + 16]), torch.from_numpy(y[a : a + 16]), torch.float64
        )
        for a in range(0, 50, 16)
    ]
    m = regression_metrics.summarise(sum(parts))
    assert m["n"] == keep.sum()
    assert m["mse"] == pytest.approx(mean_squared_error(y[keep], p[keep]))
    assert m["mae"] == pytest.approx(mean_absolute_error(y[keep], p[keep]))
    assert m["r2"] == pytest.approx(r2_score(y[keep], p[keep]))


def _old_style_store(out) -> str:
    """A regression store as kdcache wrote it before targets were kept (no `target` column, no
    `targets` in the manifest, the fingerprint of that time): tests/fixtures/kdcache2-regression,
    written by the code of commit b1d331c, copied so that nothing here can change it."""
    shutil.copytree(REPO / "tests" / "fixtures" / "kdcache2-regression", out)
    return str(out)


def test_old_store_without_targets_trains_teacher_only(tmp_path):
    old = _old_style_store(tmp_path / "old")
    r = CacheReader(old)
    assert r.targets_info is None and "target" not in r.read_shard(0) and r.verify() == []
    assert r.task == "regression" and r.num_rows == 10
    # the data it was computed from, and a student of the same width (RegNet's 3 outputs)
    old_cfg = dict(
        student="tests.toy_models:RegNet",
        data="tests.toy_models:ToyData",
        data_args={"n": 10},
        eval_data="tests.toy_models:RegData",
        eval_data_args={"n": 64, "seed": 5, "width": 3},
        batch_size=4,
    )
    cfg = config(tmp_path / "o", old, **old_cfg)
    result = run(cfg)
    rows = result["rows"]
    assert (
        cfg.alpha is None
        and result["summary"]["settings"]["alpha"] == 1.0
        and all(r["hard_loss"] == 0 and r["loss"] == r["soft_loss"] for r in rows)
    )
    assert rows[-1]["eval_mse"] is not None and rows[-1]["teacher_mse"] is not None
    assert rows[-1]["soft_loss"] < rows[0]["soft_loss"]  # it learns the old store's outputs
    with pytest.raises(UsageError, match=r"--alpha 0.5 .* stores none") as err:
        run(config(tmp_path / "o2", old, alpha=0.5, **old_cfg))
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="--normalize-targets"):
        run(config(tmp_path / "o3", old, normalize_targets=True, **old_cfg))


@pytest.mark.parametrize(
    ("data_args", "needle"),
    [
        (DATA | {"bad_index": 20}, r"sample 20: target \[nan, nan\] is not finite"),
        (
            DATA | {"bad_index": 20, "vectorised": True},
            r"sample 20: target \[nan, nan\] is not finite",
        ),
        (
            DATA | {"bad_index": 20, "bad": "width"},
            "sample 20: target has 3 values but sample 16 has 2",
        ),
        ({"n": N, "width": 3}, "has 3 values but the teacher outputs 2"),
    ],
)
def test_bad_targets_are_refused_in_one_line(tmp_path, data_args, needle):
    with pytest.raises(UsageError, match=needle) as err:
        reg_precompute(tmp_path / "s", data_args=data_args)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_task_mismatch_between_store_and_student_is_refused(tmp_path, cache):
    toy_precompute(tmp_path / "cls", data_args={"n": N})
    with pytest.raises(UsageError, match="--task regression but the cache .* classification") as e1:
        run(config(tmp_path / "o", str(tmp_path / "cls"), task="regression"))
    with pytest.raises(UsageError, match="--task classification but the cache .* regression") as e2:
        run(config(tmp_path / "o", cache, task="classification"))
    # A finished regression student evaluated against a classifier's store.
    run(config(tmp_path / "r", cache, epochs=1))
    with pytest.raises(UsageError, match="holds a classification teacher but the student") as e3:
        jobs.evaluate(
            EvaluateConfig(
                checkpoint=str(tmp_path / "r"), data="tests.toy_models:RegData",
                data_args={"n": 64}, cache=str(tmp_path / "cls"), device="cpu",
            )
        )  # fmt: skip
    assert all("\n" not in str(e.value) for e in (e1, e2, e3))


def test_eval_data_without_targets_is_refused(tmp_path, cache):
    with pytest.raises(UsageError, match="--eval-data has no targets"):
        run(config(tmp_path / "o", cache, eval_data_args={"n": 64, "every_missing": 1}))


def test_inspect_shows_target_statistics(cache):
    from click.testing import CliRunner

    from kdcache.pipeline.cli import main

    out = CliRunner().invoke(main, ["inspect", cache, "--json"])
    shown, stats = json.loads(out.output), CacheReader(cache).manifest["stats"]
    assert shown["target_rows"] == 64 and shown["teacher_mse"] == stats["teacher_mse"]
    assert shown["target_std"] == stats["target_std"] and len(shown["target_std"]) == 2


def test_cli_train_and_evaluate_lines(tmp_path, cache, cli):
    from tests.conftest import assert_one_line_error

    out = tmp_path / "s"
    args = ["train", "--cache", cache, "--student", "tests.toy_models:LinearReg"]
    args += [
        "--data",
        "tests.toy_models:RegData",
        "--data-arg",
        f"n={N}",
        "--data-arg",
        "every_missing=3",
    ]
    args += ["--eval-data", "tests.toy_models:RegData", "--eval-data-arg", "n=64"]
    args += ["--out", out, "--epochs", "2", "--device", "cpu", "--alpha", "0.5"]
    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    assert res.stdout.startswith("trained s: eval_mse ") and "vs teacher mse " in res.stdout
    assert "agreement" not in res.stdout and "eval_accuracy" not in res.stdout
    assert "eval_mse" in res.stderr and "teacher_r2" in res.stderr  # the epoch log lines
    summary = json.loads((out / "summary.json").read_text())
    res = cli(
        "evaluate", "--checkpoint", out, "--data", "tests.toy_models:RegData", "--data-arg", "n=64"
    )
    assert res.exit_code == 0, res.stderr
    shown = dict(line.split(maxsplit=1) for line in res.stdout.strip().splitlines())
    assert float(shown["mse"]) == pytest.approx(summary["final"]["eval_mse"], abs=1e-4)
    assert shown["teacher_mse"] == "-" and "accuracy" not in shown
    bad = cli(*args[:-2], "--alpha", "0.5", "--task", "classification")
    assert bad.exit_code == 2
    assert_one_line_error(bad.stderr, "--task classification", "regression teacher")
