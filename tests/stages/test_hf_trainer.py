"""`kdcache.KDTrainer` end to end (issue 23): tiny GPT-2 and Llama students built from configs
train on a real store through Hugging Face's Trainer; its loss on a fixed batch is `kd_loss`'s;
a run resumed from a Trainer checkpoint ends where an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch

import kdcache
from kdcache.storage.errors import UsageError
from tests import toy_models
from tests.conftest import LM_ROWS as N

transformers = pytest.importorskip("transformers")


def gpt2(seed: int = 1):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=64, n_layer=1, n_head=2, n_embd=16, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def llama(seed: int = 1):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def args(out, **kw):
    settings = dict(
        output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=1e-2, max_steps=30, logging_steps=5, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    return transformers.TrainingArguments(**(settings | kw))


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_kdtrainer_loss_falls_and_equals_kd_loss(lm_stores, tmp_path, build):
    cache = kdcache.open_cache(lm_stores["topk"])
    ds = cache.dataset(toy_models.ToyTokens(N))
    model = build()
    trainer = kdcache.KDTrainer(
        model=model, args=args(tmp_path, gradient_accumulation_steps=2), train_dataset=ds,
        alpha=0.5, temperature=1.0,
    )  # fmt: skip
    batch = cache.collate([ds[i] for i in (3, 0, 7, 11)])
    model.eval()
    with torch.no_grad():
        got = float(trainer.compute_loss(model, dict(batch)))
        z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = float(kdcache.kd_loss(z, batch, alpha=0.5, temperature=1.0))
    assert got == pytest.approx(want, abs=1e-5)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kd_loss" in h]
    assert len(logs) == 6 and all(h["ce_loss"] > 0 and h["kd_loss"] > 0 for h in logs)
    for h in logs:  # the logged loss is the mix of the two logged terms
        assert h["loss"] == pytest.approx(0.5 * h["kd_loss"] + 0.5 * h["ce_loss"], abs=1e-4)
    assert logs[-1]["loss"] < 0.95 * logs[0]["loss"]
    # Evaluation on a cache dataset: the mean of kd_loss over its (equal-sized) batches.
    model.eval()
    with torch.no_grad():
        want = []
        for i in range(0, N, 4):
            b = cache.collate([ds[j] for j in range(i, i + 4)])
            z = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            want.append(float(kdcache.kd_loss(z, b, alpha=0.5, temperature=1.0)))
    got = trainer.evaluate(ds)["eval_loss"]
    assert got == pytest.approx(sum(want) / len(want), abs=1e-5)


def test_kdtrainer_refuses_a_student_of_another_vocabulary(lm_stores, tmp_path):
    ds = kdcache.open_cache(lm_stores["topk"]).dataset(toy_models.ToyTokens(N))
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=65, n_layer=1,
                                         n_head=2, n_embd=16, n_positions=32))  # fmt: skip
    with pytest.raises(UsageError, match="vocabulary is 64: build it with vocab_size=64"):
        kdcache.KDTrainer(model=model, args=args(tmp_path), train_dataset=ds)
    with pytest.raises(TypeError, match="train_dataset=cache.dataset"):
        kdcache.KDTrainer(model=gpt2(), args=args(tmp_path), train_dataset=list(ds))


def test_resume_from_a_trainer_checkpoint_ends_where_one_run_does(lm_stores, tmp_path):
    cache = kdcache.open_cache(lm_stores["sampled"])
    ds = cache.dataset(toy_models.ToyTokens(N))
    kw = dict(max_steps=12, save_strategy="steps", save_steps=6, logging_steps=6)
    whole = gpt2()
    kdcache.KDTrainer(model=whole, args=args(tmp_path / "a", **kw), train_dataset=ds).train()
    # A fresh trainer and model resumed from the run's step-6 checkpoint.
    resumed = gpt2(seed=7)  # its weights come from the checkpoint
    t = kdcache.KDTrainer(model=resumed, args=args(tmp_path / "b", **kw), train_dataset=ds)
    t.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    assert t.state.global_step == 12
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
