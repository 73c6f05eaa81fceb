"""bench/bench_stage_one.py runs end to end at a toy size and prints one table per vocabulary."""

from __future__ import annotations

import pytest

from bench import bench_stage_one


@pytest.mark.slow
def test_stage_one_bench_prints_its_table(capsys, tmp_path):
    bench_stage_one.main(["--vocab", "1024", "--rows", "2", "--batch", "2", "--hidden", "32",
                          "--rounds", "1", "--workdir", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert "V = 1,024" in out
    for run in ("bare teacher(input_ids)", "precompute sampled N=50", "precompute topk k=128"):
        assert f"| {run} |" in out
