"""The language-model examples: the pinned torch-sources corpus, its tokenizer, TextBlocks, and
the GPT-2 / from_folder / TinyCausalLM models through forward_tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.pipeline.examples import text
from kdcache.pipeline.examples.lm import TinyCausalLM, from_folder, gpt2
from kdcache.stages.common.data import forward_tokens, get_batch
from kdcache.stages.common.hooks import logits_of
from kdcache.storage.errors import UsageError

# A toy tokenizer: trained on the train split's first 100 kB, 300 ids (256 bytes, EOS, merges).
TOY = {"vocab": 300, "max_bytes": 100_000}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("text")


def test_corpus_is_pinned_big_and_split_by_file_without_overlap():
    c = text.corpus()
    assert (c.sha256, c.nbytes) == (text.CORPUS_SHA256, text.CORPUS_BYTES)
    assert c.nbytes >= 5_000_000
    paths = [rel for rel, _ in c.files]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    assert "torch/nn/modules/linear.py" in paths and "torch/version.py" not in paths
    train = {rel for rel, _ in c.files if text.split_of(rel) == "train"}
    validation = {rel for rel, _ in c.files if text.split_of(rel) == "validation"}
    assert not train & validation and train | validation == set(paths)
    assert 0.02 < len(validation) / len(paths) < 0.1


def test_another_torch_or_other_bytes_fail_in_one_line(monkeypatch):
    load = text.corpus.__wrapped__  # past the per-process cache
    monkeypatch.setattr(torch, "__version__", "2.14.0+cpu")
    with pytest.raises(UsageError) as err:
        load(True)
    msg = str(err.value)
    assert "2.14.0+cpu" in msg and "torch==2.13.0" in msg and "check=false" in msg
    assert "\n" not in msg
    assert load(False).sha256 == text.CORPUS_SHA256  # the escape hatch
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    monkeypatch.setattr(text, "CORPUS_SHA256", "0" * 64)
    with pytest.raises(UsageError, match="not the pinned 000000000000.*check=false"):
        load(True)


def test_tokenizer_is_deterministic_and_trained_on_train_only(tmp_path):
    folders = [text.cache_folder(cache_dir=tmp_path / d, **TOY) for d in ("a", "b")]
    toks = [text.load_tokenizer(f, **TOY) for f in folders]
    a, b = ((f / "tokenizer.json").read_bytes() for f in folders)
    assert a == b and toks[0].get_vocab_size() == 300 and toks[0].token_to_id(text.EOS) == 0
    sample = text.split_texts("validation")[0][:500]
    assert toks[0].decode(toks[0].encode(sample).ids) == sample  # byte-level: lossless
    # The key holds the settings: another vocabulary is another folder.
    assert text.cache_folder(cache_dir=tmp_path, vocab=301, max_bytes=100_000) != folders[0]


@pytest.mark.parametrize("split", ["train", "validation"])
def test_blocks_are_consecutive_slices_of_the_tokenized_split(cache_dir, split):
    ds = text.TextBlocks(split, block=64, max_tokens=3000, cache_dir=cache_dir, **TOY)
    texts = text.split_texts(split)
    expected = text.encode(ds.tokenizer, texts[:1])
    for i in range(1, len(texts)):
        if len(expected) >= 3000:
            break
        expected = np.concatenate([expected, text.encode(ds.tokenizer, texts[i : i + 1])])
    assert len(ds) == 3000 // 64 and ds.vocab_size == 300
    for i in (0, 1, len(ds) - 1):
        item = ds[i]
        assert item.dtype == torch.int64 and item.shape == (64,)
        assert item.tolist() == expected[i * 64 : (i + 1) * 64].tolist()
    batch = ds.get_batch(np.array([3, 0]))
    assert batch["input_ids"].tolist() == [ds[3].tolist(), ds[0].tolist()]
    assert batch["attention_mask"].dtype == np.int64 and batch["attention_mask"].all()
    again = text.TextBlocks(split, block=64, max_tokens=3000, cache_dir=cache_dir, **TOY)
    every = np.stack([ds[i].numpy() for i in range(len(ds))])
    assert np.array_equal(again.get_batch(np.arange(len(ds)))["input_ids"], every)


def test_bad_text_arguments_are_usage_errors(cache_dir):
    with pytest.raises(UsageError, match="split='test' is not one of train, validation"):
        text.TextBlocks("test", cache_dir=cache_dir, **TOY)
    with pytest.raises(UsageError, match="vocab=100 is too small"):
        text.TextBlocks(cache_dir=cache_dir, vocab=100, max_bytes=1000)


def mixed_batch(vocab: int):
    items = [
        torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3, 5)
    ]
    inputs, _ = get_batch(items, np.arange(3), tokens=True)
    return items, inputs


def test_gpt2_from_config_right_padding_changes_no_valid_logit():
    model = gpt2(vocab_size=50, n_embd=32, n_positions=16).eval()
    items, inputs = mixed_batch(50)
    with torch.no_grad():
        z = logits_of(forward_tokens(model, inputs))
        # Padding fed as if real tokens: causal attention still keeps it from earlier positions.
        ones = {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}
        unmasked = logits_of(forward_tokens(model, ones))
        for j, item in enumerate(items):
            alone = logits_of(model(item[None]))[0]
            assert torch.allclose(z[j, : len(item)], alone, atol=1e-5)
            assert torch.allclose(unmasked[j, : len(item)], alone, atol=1e-5)
    assert z.shape == (3, 7, 50)
    same = gpt2(vocab_size=50, n_embd=32, n_positions=16)
    other = gpt2(vocab_size=50, n_embd=32, n_positions=16, seed=1)
    w = model.state_dict()
    assert all(torch.equal(w[k], v) for k, v in same.state_dict().items())
    assert not torch.equal(w["lm_head.weight"], other.state_dict()["lm_head.weight"])


def test_from_folder_gives_the_saved_model(tmp_path):
    model = gpt2(vocab_size=40, n_embd=16, n_positions=16, seed=3).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = from_folder(tmp_path / "m").eval()
    _, inputs = mixed_batch(40)
    with torch.no_grad():
        want = logits_of(forward_tokens(model, inputs))
        assert torch.equal(logits_of(forward_tokens(loaded, inputs)), want)
    with pytest.raises(UsageError, match="no config.json"):
        from_folder(tmp_path)


def test_tiny_causal_lm_is_seeded_and_causal():
    model = TinyCausalLM(vocab_size=30, dim=8, seed=2)
    x = torch.randint(0, 30, (2, 6))
    z = model(x)
    assert z.shape == (2, 6, 30)
    assert torch.equal(TinyCausalLM(vocab_size=30, dim=8, seed=2)(x), z)
    changed = x.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 30
    assert torch.equal(model(changed)[:, :4], z[:, :4])
