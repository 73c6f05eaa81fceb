"""Stage two for causal-lm: next-token CE, per-token metrics and agreement, the mask, and training
steps on hand-built packed batches whose loss equals a direct computation.

`PackedStream` / `FakeReader` play a store with exactly known contents (a known bigram teacher's
codec columns); tests/stages/test_lm_cli.py runs the real store end to end.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcache.pipeline import jobs
from kdcache.pipeline.runtime import Dist
from kdcache.stages.common import data as data_module
from kdcache.stages.evaluate.config import EvaluateConfig
from kdcache.stages.evaluate.run import AgreementSet, dataset_batches, eval_sums
from kdcache.stages.evaluate.run import run as evaluate
from kdcache.stages.tasks import causal_lm as lm
from kdcache.stages.tasks.scoring import summarise
from kdcache.stages.train import streams as streams_module
from kdcache.stages.train import trainer as train_module
from kdcache.stages.train.run_folder import RunFolder
from kdcache.stages.train.run_log import parse_csv
from kdcache.stages.train.trainer import TrainConfig, Trainer
from kdcache.storage import faults
from kdcache.storage.codecs import open_codec
from kdcache.storage.errors import UsageError

V = 7
LENGTHS = (5, 3, 6, 2, 4, 6, 1, 5)


class TokenData:
    """Seeded blocks of token ids of different lengths (1-D int64 tensors)."""

    def __init__(self, n: int = len(LENGTHS), seed: int = 0, lengths=LENGTHS):
        g = torch.Generator().manual_seed(seed)
        self.items = [
            torch.randint(0, V, (lengths[i % len(lengths)],), generator=g) for i in range(n)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class BigramLM(nn.Module):
    """Logits of the token after t from token t alone: (B, L) ids -> (B, L, V)."""

    def __init__(self, seed: int = 0, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, 8)
        self.head = nn.Linear(8, V)
        with torch.no_grad():
            self.head.weight.mul_(scale)

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.head(torch.tanh(self.emb(input_ids)))}


# ----------------------------------------------------------------- stand-ins for the contract


def _pad(items, ids) -> dict:
    rows = [items[int(i)] for i in ids]
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for b, r in enumerate(rows):
        input_ids[b, : len(r)], mask[b, : len(r)] = r, 1
    return {"input_ids": input_ids, "attention_mask": mask}


def codec_of(name: str, k: int = 3):
    settings = {"codec": name, "dtype": "float32", "num_classes": V}
    return open_codec(settings | ({"top_k": k} if name == "topk" else {}), "causal-lm")


TEACHER_T = 2.0


def teacher_tokens(ds, ids) -> torch.Tensor:
    """The known teacher's logits at the valid positions of rows `ids`, packed (T, V)."""
    x = _pad(ds.items, ids)
    with torch.no_grad():
        z = BigramLM(seed=7, scale=3.0)(x["input_ids"])["logits"]
    return z[x["attention_mask"].bool()]


def packed_batch(ds, ids, codec) -> dict:
    """One batch as the contract's stream yields it for a causal-lm store."""
    columns, _ = codec.encode(teacher_tokens(ds, ids) / TEACHER_T)
    x = _pad(ds.items, ids)
    return {
        "sample_id": torch.as_tensor(ids, dtype=torch.int64),
        "view": torch.zeros(len(ids), dtype=torch.int32),
        "label": torch.full((len(ids),), -1, dtype=torch.int64),
        "length": x["attention_mask"].sum(1).int(),
        **{k: torch.from_numpy(np.asarray(v)) for k, v in columns.items()},
        "input": x,
    }


class FakeReader:
    """What stage two reads of a causal-lm store: two shards of the data's rows."""

    task, temperature, has_features, fingerprint = "causal-lm", TEACHER_T, False, "fake"
    url, num_classes, views = "fake://store", V, None

    @property
    def num_samples(self) -> int:
        return self.num_rows

    def __init__(self, ds, codec):
        self.ds, self.codec = ds, codec
        half = len(ds) // 2
        self.shards = [np.arange(half), np.arange(half, len(ds))]

    def read_shard(self, i, features=True):
        batch = packed_batch(self.ds, self.shards[i], self.codec)
        return {k: v.numpy() for k, v in batch.items() if k != "input"}


class PackedStream(torch.utils.data.IterableDataset):
    """Stands in for the store's JoinedStream: batches of 3 rows in id order, every epoch."""

    def __init__(self, reader, data, batch_size, **_):
        self.reader, self.data, self.batch_size = reader, data, batch_size

    def set_epoch(self, epoch):
        pass

    def num_batches(self, rank=None):
        return len(self)

    def __len__(self):
        return math.ceil(len(self.data) / self.batch_size)

    def __iter__(self):
        for a in range(0, len(self.data), self.batch_size):
            ids = np.arange(a, min(len(self.data), a + self.batch_size))
            yield packed_batch(self.data, ids, self.reader.codec)


# ----------------------------------------------------------------- hand computations


def by_hand_next_token(model, ds, ids) -> tuple[float, float, int]:
    """(mean CE in nats/token, next-token accuracy, tokens) by a loop over each row's tokens."""
    nll = hits = count = 0
    for i in ids:
        row = ds.items[int(i)]
        z = model(row[None])["logits"][0].double()
        for t in range(len(row) - 1):
            nll -= float(torch.log_softmax(z[t], -1)[row[t + 1]])
            hits += int(z[t].argmax()) == int(row[t + 1])
            count += 1
    return nll / count, hits / count, count


def test_next_token_loss_by_hand():
    z = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0], [9.0, 0.0, 0.0]]])
    ids = torch.tensor([[2, 0, 1, 2]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # Pairs (0, 1) and (1, 2) are valid; position 2's successor is padding.
    want = -(math.log(math.exp(1) / (math.exp(1) + math.exp(2) + math.exp(0.5))))
    want -= math.log(math.exp(-1) / (1 + math.exp(-1) + math.exp(3)))
    assert float(lm.next_token_loss(z, ids, mask)) == pytest.approx(want / 2, rel=1e-6)
    assert lm.next_token_labels(ids, mask).tolist() == [[0, 1, -1, -1]]


def test_padding_changes_nothing():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, V, generator=g)
    ids = torch.randint(0, V, (2, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    # The same rows padded to 7 with garbage ids and logits where the mask is 0.
    z2 = torch.randn(2, 7, V, generator=g) * 100
    ids2 = torch.randint(0, V, (2, 7), generator=g)
    mask2 = torch.zeros(2, 7, dtype=torch.int64)
    keep = mask.bool()
    z2[:, :4][keep], ids2[:, :4][keep], mask2[:, :4] = z[keep], ids[keep], mask
    assert float(lm.next_token_loss(z2, ids2, mask2)) == float(lm.next_token_loss(z, ids, mask))
    assert torch.equal(lm.valid_tokens(z2, mask2), lm.valid_tokens(z, mask))
    soft = codec_of("dense")
    stored = {"logits": lm.valid_tokens(z, mask).flip(-1)}
    a = soft.soft_loss(lm.valid_tokens(z, mask), stored, 2.0, 2.0)
    b = soft.soft_loss(lm.valid_tokens(z2, mask2), stored, 2.0, 2.0)
    assert float(a) == float(b)


def test_per_token_metrics_by_hand():
    ds, model = TokenData(), BigramLM(seed=3).eval()
    ids = np.arange(len(ds))
    with torch.no_grad():
        loss, acc, count = by_hand_next_token(model, ds, ids)
    batches = dataset_batches(ds, 3, task="causal-lm")
    m = summarise(eval_sums(model, batches, torch.device("cpu"), task="causal-lm"))
    assert m["n"] == count == sum(n - 1 for n in LENGTHS)
    # Metrics are computed in the logits' own float32 (issue 22: no float64 copy of the logits);
    # the by-hand loop is float64, so they agree to float32's rounding, not 1e-9 as before.
    assert m["loss"] == pytest.approx(loss, rel=1e-6)
    assert m["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert lm.perplexity(m["loss"]) == pytest.approx(math.exp(loss))
    # Additive: two ranks' shares sum to the whole.
    parts = [
        eval_sums(
            model, dataset_batches(ds, 2, r, 2, "causal-lm"), torch.device("cpu"), task="causal-lm"
        )
        for r in (0, 1)
    ]
    assert summarise(parts[0] + parts[1])["loss"] == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("codec", ["topk", "dense"])
def test_agreement_per_token(codec):
    ds, model = TokenData(), BigramLM(seed=2).eval()  # agrees on 2 of the 7 token ids
    reader = FakeReader(ds, codec_of(codec))
    agree = AgreementSet(reader, ds, rows=6)  # the first shard's 4 rows and 2 of the second
    hits = total = 0
    with torch.no_grad():
        for i in range(6):
            student = model(ds.items[i][None])["logits"][0].argmax(-1)
            teacher = teacher_tokens(ds, [i]).argmax(-1)
            hits += int((student == teacher).sum())
            total += len(teacher)
    sums = eval_sums(model, agree.batches(4), torch.device("cpu"), task="causal-lm")
    m = summarise(sums)
    assert m["n"] == total == sum(LENGTHS[:6])
    assert m["accuracy"] == pytest.approx(hits / total, abs=1e-12)
    assert 0 < hits < total  # the comparison means something


def test_agreement_refuses_other_token_data():
    reader = FakeReader(TokenData(), codec_of("dense"))
    other = TokenData()
    other.items = [t[:-1] if len(t) > 1 else t for t in other.items]
    with pytest.raises(UsageError, match="tokens in these rows"):
        list(AgreementSet(reader, other, rows=8).batches(8))


# ----------------------------------------------------------------- the trainer


def lm_config(out, **overrides) -> TrainConfig:
    fields = dict(
        student="tests.stages.test_train_lm:BigramLM",
        data="tests.stages.test_train_lm:TokenData",
        eval_data="tests.stages.test_train_lm:TokenData",
        eval_data_args={"seed": 1},
        out=str(out),
        epochs=3,
        batch_size=3,
        lr=5e-2,
        warmup=0.0,
        device="cpu",
        quiet=True,
        alpha=0.6,
        ignore_fingerprint=True,
    )
    fields.update(overrides)
    cfg = TrainConfig(**fields)
    cfg.validate()
    return cfg


def kl_t2(teacher: torch.Tensor, student: torch.Tensor, T: float) -> torch.Tensor:
    p = F.softmax(teacher.double() / T, -1)
    return (p * (p.log() - F.log_softmax(student.double() / T, -1))).sum(-1).mean() * T**2


def topk_buckets_t2(teacher: torch.Tensor, student: torch.Tensor, k: int, T: float) -> float:
    """The (k + 1)-bucket KL at T == the stored T, by a loop over tokens."""
    total = 0.0
    for zt, zs in zip(teacher.double(), student.double(), strict=True):
        p, q = F.softmax(zt / T, -1), F.softmax(zs / T, -1)
        top = torch.topk(zt, k).indices
        rest = torch.ones(V, dtype=torch.bool)
        rest[top] = False
        pb = torch.cat([p[top], p[rest].sum()[None]])
        qb = torch.cat([q[top], q[rest].sum()[None]])
        total += float((pb * (pb.log() - qb.log())).sum())
    return total / len(teacher) * T**2


def plugin_codec():
    """A third-party codec with `soft_loss` only (no per-token targets): the plain loss path."""
    from kdcache.storage.codecs.base import Codec
    from kdcache.storage.codecs.dense import Dense

    plain = type("PlainDense", (Dense,), {"token_targets": Codec.token_targets})
    return plain({"codec": "dense", "dtype": "float32", "num_classes": V}, "causal-lm")


@pytest.mark.parametrize("codec", ["dense", "topk", "plugin-dense"])
def test_training_on_packed_batches(tmp_path, monkeypatch, codec):
    monkeypatch.setattr(streams_module, "JoinedStream", PackedStream)
    ds, eval_ds = TokenData(), TokenData(seed=1)
    reader = FakeReader(ds, plugin_codec() if codec == "plugin-dense" else codec_of(codec))
    cfg = lm_config(tmp_path / "run", cache="fake://store")
    torch.manual_seed(cfg.seed)
    student = BigramLM(seed=1)
    initial = copy.deepcopy(student)
    trainer = Trainer(
        cfg, Dist(), torch.device("cpu"), reader, RunFolder(cfg.out), ds, eval_ds, student
    )
    assert trainer.task.name == "causal-lm" and trainer.cfg.temperature == TEACHER_T
    with trainer:
        result = trainer.run()

    # The first step's loss, recomputed directly from the known teacher and the initial student.
    ids = np.arange(3)
    x = _pad(ds.items, ids)
    with torch.no_grad():
        z = initial(x["input_ids"])["logits"]
    zt, teacher = z[x["attention_mask"].bool()], teacher_tokens(ds, ids)
    if codec.endswith("dense"):
        soft = float(kl_t2(teacher, zt, TEACHER_T))
    else:
        soft = topk_buckets_t2(teacher, zt, 3, TEACHER_T)
    nll = [
        -float(torch.log_softmax(z[b, t].double(), -1)[x["input_ids"][b, t + 1]])
        for b in range(3)
        for t in range(int(x["attention_mask"][b].sum()) - 1)
    ]
    hard = sum(nll) / len(nll)
    first = result["history"][0]
    assert first["soft_loss"] == pytest.approx(soft, rel=1e-5)
    assert first["hard_loss"] == pytest.approx(hard, rel=1e-5)
    assert first["loss"] == pytest.approx(0.6 * soft + 0.4 * hard, rel=1e-5)

    # Trained, measured per token every epoch, and written out.
    rows = result["rows"]
    assert rows[-1]["loss"] < rows[0]["loss"]
    for row in rows:
        assert row["eval_perplexity"] == pytest.approx(math.exp(row["eval_loss"]))
        assert 0 <= row["agreement"] <= 1 and row["tokens_per_sec"] > 0
    csv_rows = parse_csv((tmp_path / "run" / "metrics.csv").read_text())
    assert csv_rows[-1]["eval_perplexity"] == pytest.approx(rows[-1]["eval_perplexity"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["settings"]["task"] == "causal-lm"
    assert summary["final"]["eval_perplexity"] == pytest.approx(rows[-1]["eval_perplexity"])
    assert summary["tokens_per_sec"] > 0


def test_epoch_loss_is_a_mean_per_token(tmp_path, monkeypatch):
    monkeypatch.setattr(streams_module, "JoinedStream", PackedStream)
    ds = TokenData()
    cfg = lm_config(tmp_path / "run", cache="fake://store", eval_data=None, lr=1e-12, epochs=1)
    reader = FakeReader(ds, codec_of("dense"))
    student = BigramLM(seed=1)
    with Trainer(
        cfg, Dist(), torch.device("cpu"), reader, RunFolder(cfg.out), ds, None, student
    ) as t:
        t.setup()
        got = t.train_epoch(1, history := [])
    tokens = [int(b["input"]["attention_mask"].sum()) for b in PackedStream(reader, ds, 3)]
    want = sum(h["soft_loss"] * n for h, n in zip(history, tokens, strict=True)) / sum(tokens)
    assert got["soft_loss"] == pytest.approx(want, rel=1e-9)  # lr ~ 0: the student is unchanged
    assert got["tokens"] == sum(LENGTHS) and got["rows"] == len(ds)


def test_without_a_cache_trains_on_next_token_ce_and_resumes(tmp_path):
    cfg = lm_config(tmp_path / "run", task="causal-lm", alpha=0.9)
    trainer = jobs.trainer(cfg, Dist())
    with trainer:
        trainer.setup()
        trainer.stream.set_epoch(1)
        batch = next(iter(trainer.stream))
        with torch.no_grad():
            z, _ = trainer.model(batch["input"])
            terms = trainer.loss_terms(z, None, batch)
        x = batch["input"]
        assert float(terms["loss"]) == float(
            lm.next_token_loss(z, x["input_ids"], x["attention_mask"])
        )
        assert float(terms["soft_loss"]) == 0.0
    assert (
        jobs.train(lm_config(tmp_path / "run", task="causal-lm"), stop_after_epoch=2)["status"]
        == "stopped"
    )
    before = faults.reached.copy()
    done = jobs.train(lm_config(tmp_path / "run", task="causal-lm"))
    ran = faults.reached - before
    assert done["status"] == "done" and [r["epoch"] for r in done["rows"]] == [1, 2, 3]
    # only epoch 3 ran: epochs 1-2 came from checkpoint-2 (a full retrain gives the same rows)
    steps = done["rows"][0]["step"]
    assert ran["train.epoch"] == 1 and ran["train.batch"] == steps


def test_task_options(tmp_path):
    with pytest.raises(UsageError, match="--task regression needs --cache"):
        lm_config(tmp_path, task="regression")
    cfg = lm_config(tmp_path / "r", cache="fake://store", task="classification")
    with pytest.raises(UsageError, match="holds a causal-lm teacher"):
        train_module.run_settings(cfg, FakeReader(TokenData(), codec_of("dense")))


def test_evaluate_a_causal_lm_student():
    # Blocks of one length: the data fingerprint's stacking of the real get_batch takes them.
    ds, eval_ds, model = TokenData(lengths=(4,)), TokenData(seed=1), BigramLM(seed=2).eval()
    reader = FakeReader(ds, codec_of("topk"))
    reader.num_rows, reader.data_fingerprint = (
        len(ds),
        data_module.data_fingerprint(ds, tokens=True),
    )
    cfg = EvaluateConfig(checkpoint="unused", data="unused", batch_size=3)
    summary = {"name": "s", "student": "BigramLM", "settings": {"task": "causal-lm"}}
    got = evaluate(cfg, model, summary, eval_ds, torch.device("cpu"), reader, ds)
    with torch.no_grad():
        loss, acc, count = by_hand_next_token(model, eval_ds, np.arange(len(eval_ds)))
    assert got["n"] == count and got["loss"] == pytest.approx(loss, rel=1e-6)  # float32 metrics
    assert got["accuracy"] == pytest.approx(acc) and got["perplexity"] == pytest.approx(
        math.exp(loss)
    )
    sums = eval_sums(
        model, AgreementSet(reader, ds, 5000).batches(8), torch.device("cpu"), task="causal-lm"
    )
    assert got["agreement"] == summarise(sums)["accuracy"] is not None
    summary["settings"]["task"] = "classification"
    with pytest.raises(UsageError, match="holds a causal-lm teacher"):
        evaluate(cfg, model, summary, eval_ds, torch.device("cpu"), reader, ds)
