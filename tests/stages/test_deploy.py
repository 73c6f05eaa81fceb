"""Deployment figures (stages/evaluate/deploy.py): sizes, timing, the int8 copy."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from kdcache.stages.evaluate import deploy
from kdcache.stages.evaluate.run import dataset_batches
from kdcache.stages.train.run_folder import RunFolder
from tests.toy_models import ToyData, ToyNet


class Wide(nn.Module):
    """An MLP big enough for int8 weights to dominate its saved size."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x):
        return self.net(x)


def test_profile_sizes_and_rates(tmp_path):
    model = ToyNet(dim=8)
    RunFolder(str(tmp_path)).write_model(model.state_dict())
    f = deploy.profile(model, deploy.sample_inputs(ToyData(40)))
    assert f["params"] == sum(p.numel() for p in model.parameters())
    assert f["weight_bytes"] == (tmp_path / "model.pt").stat().st_size  # what model.pt holds
    assert f["latency_b1"] > 0 and f["latency_b256"] > 0
    assert f["samples_per_sec"] == pytest.approx(256 / f["latency_b256"])
    assert f["threads"] == torch.get_num_threads()


def test_sample_inputs_repeat_a_small_data_set():
    x = deploy.sample_inputs(ToyData(40))
    first, _ = next(iter(dataset_batches(ToyData(40), 40)))
    assert x.shape == (256, *first.shape[1:])
    assert torch.equal(x[:40], first) and torch.equal(x[40:80], first)


def test_timing_is_a_median_after_warmup_within_a_budget(tmp_path, monkeypatch):
    count = tmp_path / "forwards"
    model = ToyNet(dim=8, sleep=0.02, count_file=str(count))
    monkeypatch.setattr(deploy, "WARMUP", 2)
    monkeypatch.setattr(deploy, "BUDGET", 0.05)
    seconds = deploy.latency(model, deploy.sample_inputs(ToyData(40))[:1])
    calls = len(count.read_text().split())
    # 2 warm-up forwards, then at least 3 timed ones and as few more as the 0.05 s budget allows.
    assert 2 + 3 <= calls <= 2 + 4
    assert 0.02 <= seconds < 0.2


def test_int8_copy_quantizes_every_linear_and_keeps_the_float_model():
    model = Wide().eval()
    q = deploy.quantize(model)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    assert not any(type(m) is nn.Linear for m in q.modules())
    assert sum(isinstance(m, DynamicLinear) for m in q.modules()) == 2
    assert all(type(m) is nn.Linear for m in model.net if isinstance(m, nn.Linear))  # untouched
    assert deploy.weight_bytes(q) < 0.5 * deploy.weight_bytes(model)  # biases stay float32
    x = deploy.sample_inputs(ToyData(40))
    with torch.no_grad():
        close = torch.allclose(q(x), model(x), atol=0.05 * float(model(x).abs().max()))
    assert close  # int8 weights change the outputs a little, not their meaning


def test_figures_give_the_float_and_int8_profiles_on_the_same_data():
    data = ToyData(300)
    model = Wide().eval()
    f = deploy.figures(model, data)
    assert f["int8"]["params"] == f["params"]
    assert f["int8"]["weight_bytes"] < f["weight_bytes"]
    float_acc = deploy.accuracy(model, data)
    assert f["int8"]["accuracy"] == pytest.approx(float_acc, abs=0.05)
    assert "int8" not in deploy.figures(model, data, int8=False)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert f["weight_bytes"] == buf.getbuffer().nbytes


def test_a_causal_lm_is_timed_on_token_blocks():
    from tests.toy_models import ToyCausalLM, ToyTokens

    data, model = ToyTokens(masked=True), ToyCausalLM().eval()
    x = deploy.sample_inputs(data, "causal-lm")
    assert set(x) == {"input_ids", "attention_mask"} and len(x["input_ids"]) == 256
    f = deploy.figures(model, data, "causal-lm")
    assert f["latency_b1"] > 0 and f["int8"]["latency_b256"] > 0
    float_acc = deploy.accuracy(model, data, "causal-lm")  # per token
    assert f["int8"]["accuracy"] == pytest.approx(float_acc, abs=0.05)
