"""Smoke tests of the benchmarks at their tiniest sizes: each runs and reports its ratios.

Nothing here checks a speed: targets are measured side by side by `make bench`, never asserted.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHES = ("bench_precompute", "bench_reader", "bench_train", "bench_lm")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # MNIST-1D is generated into a throwaway folder, never the user's ~/.cache.
    return tmp_path_factory.mktemp("mnist1d")


@pytest.mark.parametrize("name", BENCHES)
def test_bench_runs_and_reports_ratios(name, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDCACHE_DATA_DIR", str(data_dir))
    bench = importlib.import_module(f"bench.{name}")
    out = tmp_path / "result.json"
    bench.main(["--tiny", "--repeat", "1", "--json", str(out), "--workdir", str(tmp_path / "w")])
    printed = capsys.readouterr().out

    result = json.loads(out.read_text())
    assert result["tables"] and all(t["rows"] for t in result["tables"])
    assert result["targets"], "every bench states at least one target ratio"
    for target in result["targets"]:
        assert math.isfinite(target["value"]) and target["value"] > 0, target
        assert target["what"] in printed
    assert "### targets" in printed
    for table in result["tables"]:
        assert table["title"] in printed


def test_reader_bench_keeps_float16_and_shows_hf_widening(tmp_path, capsys):
    from bench import bench_reader

    out = tmp_path / "result.json"
    bench_reader.main(["--tiny", "--repeat", "1", "--json", str(out), "--workdir", str(tmp_path)])
    capsys.readouterr()
    (table,) = [t for t in json.loads(out.read_text())["tables"] if t["title"].startswith("dtypes")]
    dtypes = dict(table["rows"])
    assert "features=float16" in dtypes["kdcache CacheStream"]
    assert "topk_logits=float16" in dtypes["kdcache CacheStream"]
    assert "topk_indices=int32" in dtypes["kdcache CacheStream"]
    assert "features=float32" in dtypes["HF datasets shuffle(seed) + iter"]


def test_run_all_writes_results(data_dir, tmp_path):
    env = {**os.environ, "KDCACHE_DATA_DIR": str(data_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run_all", "--tiny", "--only", "bench_precompute",
         "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    (bench,) = results["benches"]
    assert bench["module"] == "bench_precompute" and bench["exit_code"] == 0
    assert bench["targets"][0]["what"].startswith("precompute / bare")
    text = (tmp_path / "results.md").read_text()
    assert "all targets" in text and "precompute / bare, TeacherCNN" in text
    assert "all targets" in proc.stdout


@pytest.mark.slow
def test_lm_loss_bench_runs_and_reports_ratios(tmp_path, capsys):
    """bench_lm_loss at its tiniest (whole `kdcache` processes: ~20 s, so slow-marked)."""
    from bench import bench_lm_loss

    out = tmp_path / "result.json"
    bench_lm_loss.main(["--tiny", "--repeat", "1", "--json", str(out), "--workdir", str(tmp_path)])
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["tables"] and all(t["rows"] for t in result["tables"])
    assert any("fused" in r[1] for r in result["tables"][0]["rows"])  # the unfused row is there
    for target in result["targets"]:
        assert math.isfinite(target["value"]) and target["value"] > 0, target
