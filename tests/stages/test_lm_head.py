"""The fused output layer: found in a GPT-2 and a Llama built from small transformers configs (no
hub) and in a declared head, exact to the unfused loss (values and gradients of every parameter,
fp32), and a whole training run fused equal to the same run with --no-fused-head."""

from __future__ import annotations

import pytest
import torch

from kdcache.pipeline.examples.lm import TinyCausalLM, gpt2
from kdcache.stages.tasks import causal_lm as lm
from kdcache.stages.tasks import lm_head, lm_loss
from kdcache.stages.train.run_log import parse_csv
from kdcache.storage.codecs import open_codec
from kdcache.storage.codecs.sampled import draw

V = 96


def llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


MODELS = {
    "gpt2": lambda: gpt2(vocab_size=V, n_layer=1, n_head=2, n_embd=32, n_positions=64, seed=1),
    "llama": llama,
    "declared": lambda: TinyCausalLM(vocab_size=V, dim=16, seed=2),
}


def tokens(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(3, 10, dtype=torch.int64)
    mask[0, 6:], mask[2, 3:] = 0, 0  # right padding
    return {"input_ids": torch.randint(0, V, (3, 10), generator=g) * mask, "attention_mask": mask}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_fused_head_equals_the_unfused_loss(name, T):
    model = MODELS[name]().train()
    x = tokens()
    head = lm_head.resolve(model, x, V, None, name)
    assert head is not None and head.linear is model.get_output_embeddings()
    model.train()
    pos = lm_loss.positions(x["input_ids"], x["attention_mask"])
    codec = open_codec({"codec": "topk", "dtype": "float32", "num_classes": V, "top_k": 5},
                       "causal-lm")  # fmt: skip
    cols, _ = codec.encode(torch.randn(pos.tokens, V, generator=torch.Generator().manual_seed(1)))
    targets = codec.token_targets({k: torch.as_tensor(v) for k, v in cols.items()}, 1.0, T, V)
    params = [p for p in model.parameters() if p.requires_grad]
    runs = []
    for fused in (False, True):
        out = head.hidden(x) if fused else lm.logits(model, x)
        loss, hard, soft = lm_loss.causal_lm_loss(out, pos, targets, T, 0.3, 0.7, 7,
                                                  head.linear if fused else None)  # fmt: skip
        runs.append((loss, hard, soft, *torch.autograd.grad(loss, params)))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_head_or_a_transformed_one_is_not_fused():
    from tests.toy_models import ToyCausalLM

    x = tokens()
    assert lm_head.resolve(ToyCausalLM(vocab_size=V), x, V, None, "toy") is None  # none exposed
    model = MODELS["declared"]()
    assert lm_head.resolve(model, x, V, False, "tiny") is None  # --no-fused-head
    scaled = MODELS["declared"]()
    scaled.forward = lambda ids: 2 * scaled.head(scaled.hidden_states(ids))  # logits != head(h)
    assert lm_head.resolve(scaled, x, V, None, "scaled") is None


def test_training_fused_equals_unfused(tmp_path, cli):
    """One epoch from a sampled store, GPT-2 student: the same losses and weights either way."""
    data = ["--data", "tests.toy_models:ToyTokens", "--data-arg", f"vocab={V}", "--data-arg",
            "n=12"]  # fmt: skip
    small = ["vocab_size=96", "n_layer=1", "n_head=2", "n_embd=16", "n_positions=32"]
    teacher = [a for p in small for a in ("--teacher-arg", p)]
    student = [a for p in [*small, "seed=1"] for a in ("--student-arg", p)]
    res = cli("precompute", "--task", "causal-lm", "--teacher", "kdcache.pipeline.examples.lm:gpt2",
              *teacher, *data, "--out", tmp_path / "s", "--random-teacher", "--device", "cpu",
              "--quiet")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    runs = {}
    for flag in ("--fused-head", "--no-fused-head"):
        out = tmp_path / flag
        res = cli("train", "--cache", tmp_path / "s", "--student",
                  "kdcache.pipeline.examples.lm:gpt2", *student, *data, "--epochs", "1",
                  "--batch-size", "4", "--loss-chunk-mb", "0.002", "--eval-logits-mb", "0.002",
                  "--eval-data", "tests.toy_models:ToyTokens", "--eval-data-arg", f"vocab={V}",
                  "--eval-data-arg", "n=5", "--out", out, "--device", "cpu", "--quiet", flag)  # fmt: skip
        assert res.exit_code == 0, res.stderr
        (row,) = parse_csv((out / "metrics.csv").read_text())
        runs[flag] = (row, torch.load(out / "model.pt"))
    (a, wa), (b, wb) = runs.values()
    for k in ("loss", "hard_loss", "soft_loss", "eval_loss", "agreement"):
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_sampled_targets_pad_to_the_draws():
    g = torch.Generator().manual_seed(0)
    ids, counts, per = draw(torch.softmax(torch.randn(4, V, generator=g), -1), 10, g)
    codec = open_codec({"codec": "sampled", "dtype": "float32", "num_classes": V, "samples": 10},
                       "causal-lm")  # fmt: skip
    sp = codec.token_targets({"sampled_n": per, "sampled_ids": ids, "sampled_counts": counts},
                             1.0, 1.0, V)  # fmt: skip
    assert sp.ids.shape == (4, 10)
    torch.testing.assert_close(sp.weights.sum(1), torch.ones(4))
