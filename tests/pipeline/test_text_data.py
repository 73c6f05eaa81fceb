"""`kdcache.text_dataset` and `kdcache.hf_causal_lm`: packing, chat targets token by token,
splits by document, the fingerprint, and both end to end through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kdcache
from kdcache.stages.common.data import data_fingerprint, get_batch
from kdcache.storage.errors import UsageError
from kdcache.storage.reader import CacheReader
from tests.pipeline import text_fixtures as fx

pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return fx.inputs(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def tok(files):
    return transformers.AutoTokenizer.from_pretrained(str(files["tokenizer"]))


def test_text_is_packed_with_eos_between_documents_or_kept_one_per_row(files, tok):
    want = [tok(d)["input_ids"] + [tok.eos_token_id] for d in fx.documents()]
    packed = kdcache.text_dataset(str(files["docs"]), str(files["tokenizer"]), block_size=16)
    flat = torch.cat([packed[i]["input_ids"] for i in range(len(packed))]).tolist()
    assert flat == [t for d in want for t in d]
    assert all(len(packed[i]["input_ids"]) == 16 for i in range(len(packed) - 1))
    assert "labels" not in packed[0]  # every token is a target
    rows = kdcache.text_dataset(
        str(files["docs"]), str(files["tokenizer"]), block_size=6, packing=False
    )
    assert [rows[i]["input_ids"].tolist() for i in range(len(rows))] == [d[:6] for d in want]


def test_only_the_assistant_tokens_are_targets(files, tok):
    ds = kdcache.text_dataset(
        str(files["chats"]), str(files["tokenizer"]), messages_field="messages", block_size=108
    )
    assert len(ds) == len(fx.chats())
    end = tok.convert_tokens_to_ids("<|end|>")
    for i, chat in enumerate(fx.chats()):
        item = ds[i]
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        assert ids == tok.apply_chat_template(chat, tokenize=True, return_dict=False)
        want = [
            t
            for m in chat
            if m["role"] == "assistant"
            for t in tok(m["content"])["input_ids"] + [end]
        ]
        assert [t for t, lab in zip(ids, labels, strict=True) if lab != -100] == want
        assert all(lab in (-100, t) for t, lab in zip(ids, labels, strict=True))
    # In the batch, a position is a target when it predicts an assistant token (causal shift).
    x, _ = get_batch(ds, np.array([1, 0]), tokens=True)
    for j, i in enumerate([1, 0]):
        labels = ds[i]["labels"]
        n = len(labels)
        assert x["target_mask"][j, : n - 1].tolist() == (labels[1:] != -100).long().tolist()
        assert not x["target_mask"][j, n - 1 :].any()


def test_splits_are_disjoint_by_document_and_seeded(files):
    def docs(split, seed=0):
        ds = kdcache.text_dataset(
            str(files["docs"]), str(files["tokenizer"]), block_size=64, packing=False,
            split=split, validation_fraction=0.25, seed=seed,
        )  # fmt: skip
        return {tuple(ds[i]["input_ids"].tolist()) for i in range(len(ds))}

    train, val = docs("train"), docs("validation")
    assert len(val) == 6 and len(train) == 18 and not train & val
    assert train | val == docs("all")
    assert docs("validation") == val and docs("validation", seed=1) != val


def test_fingerprint_covers_the_bytes_the_tokenizer_and_the_settings(files, tmp_path):
    def fp(path, tokenizer=files["tokenizer"], **kw):
        ds = kdcache.text_dataset(str(path), str(tokenizer), **({"block_size": 16} | kw))
        return data_fingerprint(ds, "causal-lm")

    base = fp(files["docs"])
    assert fp(files["docs"]) == base
    assert fp(files["docs"], block_size=17) != base
    other = tmp_path / "docs.jsonl"
    data = bytearray(files["docs"].read_bytes())
    data[data.rindex(b'"id": ') + 6] ^= 1  # one digit of the last row's id: no token changes
    other.write_bytes(bytes(data))
    assert fp(other) != base
    # The same tokens from a tokenizer saved with another setting: another tokenizer.
    assert fp(files["docs"], fx.tokenizer(tmp_path / "tok", max_length=100)) != base


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        ({"text_field": "body"}, ("text_field='body'", "has id, text")),
        ({"messages_field": "turns"}, ("messages_field='turns'",)),
        ({"block_size": 4096}, ("block_size=4096", "model_max_length 128")),
    ],
)
def test_bad_settings_name_the_value(files, kwargs, needles):
    with pytest.raises(UsageError) as err:
        kdcache.text_dataset(str(files["docs"]), str(files["tokenizer"]), **kwargs)
    assert all(n in str(err.value) for n in needles) and "\n" not in str(err.value)


def test_a_built_model_is_seeded_and_declared_random(files, tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
    )  # fmt: skip
    cfg.save_pretrained(tmp_path)

    def build(seed=None, generator=0):
        torch.manual_seed(generator)  # what `kdcache train --seed` does before the student
        return kdcache.hf_causal_lm(config=str(tmp_path), num_hidden_layers=1, seed=seed)

    def same(a, b):
        return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))

    a = kdcache.hf_causal_lm(config=str(tmp_path / "config.json"), num_hidden_layers=1, seed=3)
    assert a.config.num_hidden_layers == 1 and a.kdcache_random_init
    assert same(a, build(seed=3, generator=1))  # a pinned seed: whatever the generator
    assert same(build(), build()) and not same(build(), build(generator=1))
    with pytest.raises(UsageError, match="exactly one"):
        kdcache.hf_causal_lm()


def kv(flag: str, pairs: list[str]) -> list[str]:
    return [a for p in pairs for a in (flag, p)]


def typed(pairs: list[str]) -> dict:
    """KEY=VALUE words as the CLI reads them: whole numbers as ints."""
    return {k: int(v) if v.isdigit() else v for k, v in (p.split("=", 1) for p in pairs)}


def test_chat_end_to_end_stores_only_assistant_tokens(files, tmp_path, cli):
    teacher = tmp_path / "teacher"
    cfg = transformers.LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        use_cache=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(teacher)
    data = [f"path={files['chats']}", f"tokenizer={files['tokenizer']}",
            "messages_field=messages", "block_size=64"]  # fmt: skip
    store = tmp_path / "store"
    res = cli(
        "precompute", "--task", "causal-lm", "--teacher", "kdcache:hf_causal_lm",
        "--teacher-arg", f"path={teacher}", "--data", "kdcache:text_dataset",
        *kv("--data-arg", data), "--out", store, "--codec", "topk", "--top-k", "4",
        "--batch-size", "4", "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    ds = kdcache.text_dataset(
        **{k: v for k, v in (p.split("=") for p in data)} | {"block_size": 64}
    )
    targets = [int((ds[i]["labels"][1:] != -100).sum()) for i in range(len(ds))]
    stats = json.loads((store / "manifest.json").read_text())["stats"]
    assert stats["tokens"] == sum(targets)
    assert stats["tokens_seen"] == sum(len(ds[i]["input_ids"]) for i in range(len(ds)))
    r = CacheReader(str(store))
    cols = r.read_shard(0, features=False)
    assert cols["length"].tolist() == [targets[i] for i in cols["sample_id"]]
    # The teacher's stored top-1 at each target position is its argmax there, token by token.
    x, _ = get_batch(ds, cols["sample_id"], tokens=True)
    model = kdcache.hf_causal_lm(path=str(teacher))
    with torch.no_grad():
        z = model(x["input_ids"], attention_mask=x["attention_mask"]).logits
    assert r.codec.teacher_top1(cols).tolist() == z[x["target_mask"].bool()].argmax(-1).tolist()
    student = [f"config={teacher}/config.json", "num_hidden_layers=1", "hidden_size=16"]
    res = cli(
        "train", "--cache", store, "--student", "kdcache:hf_causal_lm",
        *kv("--student-arg", student), "--data", "kdcache:text_dataset",
        *kv("--data-arg", data), "--epochs", "1", "--batch-size", "4", "--device", "cpu",
        "--out", tmp_path / "student", "--quiet",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    # Trained on the target tokens only (tokens/s is their count over the training seconds).
    assert abs(summary["tokens_per_sec"] * summary["train_seconds"] - sum(targets)) < 0.5
    # Another data set than the cache's: refused in one line, nothing trained.
    res = cli(
        "train", "--cache", store, "--student", "kdcache:hf_causal_lm",
        *kv("--student-arg", student), "--data", "kdcache:text_dataset",
        *kv("--data-arg", [*data[:-1], "block_size=48"]), "--epochs", "1", "--device", "cpu",
        "--out", tmp_path / "other", "--quiet",
    )  # fmt: skip
    assert res.exit_code == 2 and "does not match the cache" in res.stderr
    assert not (tmp_path / "other" / "summary.json").exists()

    # The same chat store through the Python API: kd_loss on a batch equals kdcache train's step.
    from kdcache.stages.train.trainer import TrainConfig
    from tests.stages.test_cache_api import first_step_terms

    cfg = TrainConfig(
        cache=str(store), student="kdcache:hf_causal_lm", out=str(tmp_path / "step"),
        student_args=typed(student), data="kdcache:text_dataset", data_args=typed(data),
        epochs=1, batch_size=4, device="cpu", quiet=True, alpha=0.5,
    )  # fmt: skip
    want, ids, model = first_step_terms(cfg)
    cache = kdcache.open_cache(str(store))
    items = cache.dataset(ds)
    batch = cache.collate([items[i] for i in ids])
    assert batch["positions"].tokens == sum(targets[i] for i in ids)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        terms = kdcache.kd_loss(logits, batch, alpha=0.5, return_terms=True)
    assert float(terms.loss) == pytest.approx(want["loss"], abs=1e-5)
    assert float(terms.kd) == pytest.approx(want["soft_loss"], abs=1e-5)
    assert float(terms.ce) == pytest.approx(want["hard_loss"], abs=1e-5)


def test_parquet_arrow_and_a_saved_folder_read_as_the_jsonl(files, tmp_path):
    import datasets

    table = datasets.Dataset.from_list([{"text": d} for d in fx.documents()])
    table.to_parquet(str(tmp_path / "docs.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    tok = str(files["tokenizer"])

    def rows(path):
        ds = kdcache.text_dataset(str(path), tok, block_size=16)
        return [ds[i]["input_ids"].tolist() for i in range(len(ds))]

    want = rows(files["docs"])
    for path in (tmp_path / "docs.parquet", arrow, tmp_path / "saved"):
        assert rows(path) == want, path


def test_stage_two_selects_exactly_the_target_positions(files):
    from kdcache.stages.tasks import causal_lm as lm
    from kdcache.stages.tasks import lm_loss

    ds = kdcache.text_dataset(
        str(files["chats"]), str(files["tokenizer"]), messages_field="messages", block_size=108
    )
    x, _ = get_batch(ds, np.arange(4), tokens=True)
    ids, mask, target = x["input_ids"], x["attention_mask"], lm.target_mask(x)
    pos = lm_loss.positions(ids, mask, target)
    want = [(b, t) for b in range(4) for t in range(ids.shape[1]) if target[b, t]]
    assert pos.index.tolist() == [b * ids.shape[1] + t for b, t in want]
    # Each target predicts the assistant token after it: that is its CE label, never a prompt's.
    assert pos.labels.tolist() == [int(ds[b]["labels"][t + 1]) for b, t in want]
    assert pos.pairs == pos.tokens == len(want) < int(mask.sum())


def test_a_conversation_truncated_before_its_answer_is_dropped(files):
    ds = kdcache.text_dataset(
        str(files["chats"]), str(files["tokenizer"]), messages_field="messages", block_size=10
    )
    assert 0 < ds.dropped < len(fx.chats()) and len(ds) + ds.dropped == len(fx.chats())
    assert all((ds[i]["labels"][1:] != -100).any() for i in range(len(ds)))
    assert all(len(ds[i]["input_ids"]) <= 10 for i in range(len(ds)))
