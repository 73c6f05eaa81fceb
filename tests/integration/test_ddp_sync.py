"""DDP training proves gradient averaging, not only that two ranks run: after every epoch the
student's parameters are identical on both ranks and match, to float rounding, one process
that sees the same rows in one batch. Without the all-reduce each rank would step on its own
half of the rows and both checks would fail (the MNIST-1D accuracy band would not notice)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.conftest import DATA, toy_precompute
from tests.integration.conftest import run_proc, subprocess_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # ~17 s: two torchrun launches

N, EPOCHS = 64, 3

# Train one epoch at a time (each call resumes from the last checkpoint, as a rerun would) and
# dump this rank's parameters right after each epoch, before the next resume loads rank 0's.
SCRIPT = """
import json, os, sys
import torch
from kdcache.pipeline.jobs import trainer
from kdcache.pipeline.runtime import process_group
from kdcache.stages.train.config import TrainConfig

fields, dump, epochs = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
with process_group("cpu") as dist:
    for epoch in range(1, epochs + 1):
        with trainer(TrainConfig(**fields), dist) as t:
            t.run(stop_after_epoch=epoch)
            state = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
            torch.save(state, os.path.join(dump, f"rank{dist.rank}-epoch{epoch}.pt"))
"""


def _train(tmp_path, name: str, cache, ranks: int, batch: int) -> dict:
    dump = tmp_path / f"{name}-params"
    dump.mkdir()
    fields = dict(
        cache=str(cache), student="tests.toy_models:ToyNet", student_args={"dim": 8, "seed": 1},
        data=DATA, data_args={"n": N}, out=str(tmp_path / name), epochs=EPOCHS,
        batch_size=batch, lr=0.05, warmup=0.0, device="cpu", quiet=True,
    )  # fmt: skip
    script = tmp_path / "epochwise.py"
    script.write_text(SCRIPT)
    args = [str(script), json.dumps(fields), str(dump), str(EPOCHS)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*launch, "--nproc-per-node", str(ranks), *args] if ranks > 1 else [sys.executable, *args]
    res = run_proc(cmd, env=subprocess_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return {p.stem: torch.load(p) for p in dump.glob("*.pt")}


def test_two_ranks_hold_identical_parameters_matching_one_process(tmp_path):
    cache = tmp_path / "cache"
    toy_precompute(cache, data_args={"n": N}, top_k=4)
    # Each epoch is one step: two ranks of 32 rows average to the gradient of all 64 rows, the
    # one batch of the single process (every loss term is a mean over the batch's rows).
    two = _train(tmp_path, "two", cache, ranks=2, batch=N // 2)
    one = _train(tmp_path, "one", cache, ranks=1, batch=N)
    for epoch in range(1, EPOCHS + 1):
        r0, r1 = two[f"rank0-epoch{epoch}"], two[f"rank1-epoch{epoch}"]
        ref = one[f"rank0-epoch{epoch}"]
        assert r0.keys() == r1.keys() == ref.keys()
        for key in ref:
            assert torch.equal(r0[key], r1[key]), (epoch, key)  # bit-identical across ranks
            torch.testing.assert_close(r0[key], ref[key], rtol=1e-5, atol=1e-6)
    moved = max((one[f"rank0-epoch{EPOCHS}"][k] - one["rank0-epoch1"][k]).abs().max() for k in ref)
    assert moved > 1e-3  # the parameters did train: the match is not between untouched weights
    assert (tmp_path / "two" / "summary.json").exists()
