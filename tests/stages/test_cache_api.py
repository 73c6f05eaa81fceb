"""The cache in one's own loop (issue 23): `open_cache`, `cache.dataset`, `cache.collate` and
`kd_loss`, against what `kdcache train`'s own step computes on the same rows of a real store."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import kdcache
from kdcache.pipeline import jobs
from kdcache.pipeline.models import load_model
from kdcache.pipeline.runtime import Dist
from kdcache.stages.train.config import TrainConfig
from kdcache.storage.errors import UsageError
from tests import toy_models
from tests.conftest import LM_ROWS, LM_SMALL

GPT2 = "kdcache.pipeline.examples.lm:gpt2"
SMALL = LM_SMALL
N = LM_ROWS


def student(seed: int = 1):
    kwargs = {k: int(v) for k, v in (p.split("=") for p in SMALL)}
    return load_model(GPT2, kwargs | {"seed": seed})[0]


def first_step_terms(cfg: TrainConfig) -> tuple[dict, list, torch.nn.Module]:
    """`kdcache train`'s loss terms on the first batch of `cfg`'s run (no step taken), that
    batch's sample ids and the student it ran."""
    cfg.validate()
    with jobs.trainer(cfg, Dist()) as trainer:
        trainer.setup()
        trainer.stream.set_epoch(1)
        batch = next(iter(trainer.stream))
        trainer.model.eval()
        with torch.no_grad():
            z, _ = trainer.model(batch["input"])
            terms = trainer.loss_terms(z, None, batch)
    return {k: float(v) for k, v in terms.items()}, batch["sample_id"].tolist(), trainer.student


def train_step_terms(store: str, tmp_path, alpha: float, temperature: float | None):
    """`kdcache train`'s loss terms on its first batch, and that batch's sample ids."""
    cfg = TrainConfig(
        cache=store, student=GPT2, student_args={"vocab_size": 64, "n_layer": 1, "n_head": 2,
        "n_embd": 16, "n_positions": 32, "seed": 1}, data="tests.toy_models:ToyTokens", data_args={"n": N},
        out=str(tmp_path / "run"), epochs=1, batch_size=6, device="cpu", quiet=True,
        alpha=alpha, temperature=temperature,
    )  # fmt: skip
    terms, ids, _ = first_step_terms(cfg)
    return terms, ids


@pytest.mark.parametrize("codec", ["sampled", "topk", "dense"])
def test_kd_loss_equals_kdcache_trains_step(lm_stores, tmp_path, codec):
    alpha, T = 0.7, (1.0 if codec == "sampled" else 2.0)  # sampled stores are read at T = 1
    want, ids = train_step_terms(lm_stores[codec], tmp_path, alpha, T)
    cache = kdcache.open_cache(lm_stores[codec])
    ds = cache.dataset(toy_models.ToyTokens(N))
    assert len(ds) == N and cache.vocab_size == 64
    batch = cache.collate([ds[i] for i in ids])
    model = student().eval()
    with torch.no_grad():
        z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = kdcache.kd_loss(z, batch, alpha=alpha, temperature=T, return_terms=True)
        # The fused variant: GPT-2's last hidden states and its output layer.
        h = model.transformer(batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        fused = kdcache.kd_loss_fused(h, model.lm_head, batch, alpha, T, return_terms=True)
    assert float(got.loss) == pytest.approx(want["loss"], abs=1e-5)
    assert float(got.kd) == pytest.approx(want["soft_loss"], abs=1e-5)
    assert float(got.ce) == pytest.approx(want["hard_loss"], abs=1e-5)
    assert float(fused.loss) == pytest.approx(float(got.loss), abs=1e-5)
    assert want["soft_loss"] > 0 and want["hard_loss"] > 0


def test_any_order_and_batch_size_gives_the_same_mean_and_gradients_flow(lm_stores):
    cache = kdcache.open_cache(lm_stores["sampled"])
    ds = cache.dataset(toy_models.ToyTokens(N), shards_in_memory=1)
    model = student()
    items = [ds[i] for i in range(N)]
    whole = cache.collate(items)
    z = model(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"]).logits
    loss = kdcache.kd_loss(z, whole, alpha=0.5)
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    # Reversed order: the same mean over the same tokens.
    back = cache.collate(items[::-1])
    z = model(input_ids=back["input_ids"], attention_mask=back["attention_mask"]).logits
    again = kdcache.kd_loss(z, back, alpha=0.5).detach()
    assert float(again) == pytest.approx(float(loss.detach()), abs=1e-5)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True, collate_fn=cache.collate)
    tokens = sum(int(b["attention_mask"].sum()) for b in loader)
    assert tokens == int(whole["attention_mask"].sum())
    item = ds[3]
    assert (
        item["labels"] == torch.where(item["attention_mask"].bool(), item["input_ids"], -100)
    ).all()


def test_bad_input_is_one_line_naming_the_fix(lm_stores):
    cache = kdcache.open_cache(lm_stores["topk"])
    with pytest.raises(UsageError, match="precomputed from.*pass that data set"):
        cache.dataset(toy_models.ToyTokens(N, seed=5))
    with pytest.raises(UsageError, match="precomputed from"):
        cache.dataset(toy_models.ToyTokens(N - 5))
    ds = cache.dataset(toy_models.ToyTokens(N))
    batch = cache.collate([ds[0], ds[1]])
    z = torch.zeros(*batch["input_ids"].shape, 65)
    with pytest.raises(UsageError, match="vocabulary is 64: build the student with vocab_size=64"):
        kdcache.kd_loss(z, batch)
    with pytest.raises(UsageError, match="no 'kd' entry"):
        kdcache.kd_loss(z[..., :64], {k: v for k, v in batch.items() if k != "kd"})
    assert np.isfinite(float(kdcache.kd_loss(z[..., :64], batch)))


def test_the_collator_and_dataset_pickle_for_dataloader_workers(lm_stores):
    cache = kdcache.open_cache(lm_stores["sampled"])
    ds = cache.dataset(toy_models.ToyTokens(N))
    collate, ds2 = pickle.loads(pickle.dumps((cache.collate, ds)))
    a, b = cache.collate([ds[2], ds[5]]), collate([ds2[2], ds2[5]])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
    assert b["kd"].num_classes == 64 and b["kd"].codec.name == "sampled"


def test_a_label_masked_to_minus_100_leaves_ce_but_stays_a_kd_target(lm_stores):
    cache = kdcache.open_cache(lm_stores["topk"])
    ds = cache.dataset(toy_models.ToyTokens(N))
    items = [ds[0], ds[1]]
    plain = cache.collate(items)
    items[0]["labels"][2] = -100  # the token at 2 is no CE target: position 1 predicts it
    masked = cache.collate(items)
    p, m = plain["positions"], masked["positions"]
    assert (m.tokens, m.pairs) == (p.tokens, p.pairs - 1)
    assert int(m.labels[1]) == -1 and int(p.labels[1]) == int(items[0]["input_ids"][2])
