"""causal-lm batches: right padding and masks, the item checks, forward_tokens, fingerprints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.pipeline.examples.lm import TinyCausalLM
from kdcache.stages.common.data import BatchView, data_fingerprint, forward_tokens, get_batch
from kdcache.stages.common.hooks import logits_of
from kdcache.storage.errors import UsageError
from tests.toy_models import ToyData


class Items(list):
    """A map-style data set of the given items."""


class Vectorised:
    def __init__(self, ids, mask=None):
        self.ids, self.mask = ids, mask

    def __len__(self):
        return len(self.ids)

    def get_batch(self, ids):
        out = {"input_ids": self.ids[ids]}
        if self.mask is not None:
            out["attention_mask"] = self.mask[ids]
        return out


MIXED = Items(
    [
        torch.tensor([5, 6, 7]),
        {"input_ids": np.array([1, 2, 3, 4, 5]), "attention_mask": np.array([1, 1, 1, 1, 0])},
        {"input_ids": [9]},
        np.array([3, 3], np.int32),
    ]
)


def test_mixed_lengths_are_right_padded_with_mask_zero():
    inputs, labels = get_batch(MIXED, np.arange(4), tokens=True)
    assert set(inputs) == {"input_ids", "attention_mask"}
    x, m = inputs["input_ids"], inputs["attention_mask"]
    assert x.dtype == m.dtype == torch.int64 and x.shape == m.shape == (4, 5)
    assert x.tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 5], [9, 0, 0, 0, 0], [3, 3, 0, 0, 0]]
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert labels.dtype == np.int64 and labels.tolist() == [-1] * 4
    # Padded to the batch's own longest item.
    assert get_batch(MIXED, np.array([0, 2]), tokens=True)[0]["input_ids"].shape == (2, 3)
    _, x, y = BatchView(MIXED, tokens=True)[[3, 0]]
    assert x["input_ids"].tolist() == [[3, 3, 0], [5, 6, 7]] and y.tolist() == [-1, -1]


def test_vectorised_batches_keep_their_mask_or_get_ones():
    ids = np.arange(12).reshape(3, 4)
    inputs, _ = get_batch(Vectorised(ids), np.array([2, 0]), tokens=True)
    assert inputs["input_ids"].tolist() == [ids[2].tolist(), ids[0].tolist()]
    assert inputs["attention_mask"].tolist() == [[1] * 4] * 2
    mask = np.array([[1, 1, 0, 0]] * 3)
    inputs, _ = get_batch(Vectorised(ids, mask), np.array([1]), tokens=True)
    assert inputs["attention_mask"].tolist() == [[1, 1, 0, 0]]


@pytest.mark.parametrize(
    "item, words",
    [
        (torch.tensor([1.0, 2.0]), ["float32", "not integers"]),
        (torch.zeros(2, 3, dtype=torch.long), ["(2, 3)", "drop"]),
        (torch.zeros(0, dtype=torch.long), ["empty"]),
        ({"input_ids": [1, 2, 3], "attention_mask": [1, 1]}, ["(2,)", "(3,)", "one mask value"]),
        ({"input_ids": [1, 2], "attention_mask": [1, 2]}, ["other than 0 and 1"]),
        ({"ids": [1, 2]}, ["'input_ids'"]),
    ],
)
def test_bad_items_name_the_sample_and_the_fix(item, words):
    ds = Items([torch.tensor([1, 2]), torch.tensor([3]), item])
    with pytest.raises(UsageError) as err:
        get_batch(ds, np.arange(3), spec="my.mod:Data", tokens=True)
    msg = str(err.value)
    assert "sample 2" in msg and "my.mod:Data" in msg and "\n" not in msg
    assert all(w in msg for w in words), msg


def test_vectorised_bad_mask_names_the_row():
    mask = np.array([[1, 1], [1, 3]])
    with pytest.raises(UsageError, match="sample 1: attention_mask holds values"):
        get_batch(Vectorised(np.ones((2, 2), np.int64), mask), np.arange(2), tokens=True)
    with pytest.raises(UsageError, match="not integers"):
        get_batch(Vectorised(np.ones((2, 2))), np.arange(2), tokens=True)


class Masked(torch.nn.Module):
    """Records what forward got."""

    def forward(self, input_ids, attention_mask=None):
        self.got = attention_mask
        return {"logits": torch.zeros(*input_ids.shape, 3)}


def test_forward_tokens_passes_the_mask_only_to_models_that_take_it():
    inputs, _ = get_batch(MIXED, np.arange(4), tokens=True)
    masked = Masked()
    assert logits_of(forward_tokens(masked, inputs)).shape == (4, 5, 3)
    assert masked.got is inputs["attention_mask"]
    tiny = TinyCausalLM(vocab_size=10, dim=8)
    z = logits_of(forward_tokens(tiny, inputs))
    assert z.shape == (4, 5, 10)
    # Causal: the right padding does not reach the valid positions of a shorter row.
    alone = tiny(torch.tensor([[5, 6, 7]]))
    assert torch.allclose(z[0, :3], alone[0], atol=1e-6)


def test_fingerprint_of_token_data_is_stable_and_content_based():
    ids = np.random.default_rng(0).integers(0, 100, (40, 8))
    a = data_fingerprint(Vectorised(ids))
    assert a == data_fingerprint(Vectorised(ids.copy()))
    # The same items per item, with the task named, hash the same as the vectorised set.
    assert a == data_fingerprint(Items(list(ids)), tokens=True)
    changed = ids.copy()
    changed[-1, 3] += 1
    assert data_fingerprint(Vectorised(changed)) != a
    mask = np.ones_like(ids)
    mask[0, -1] = 0
    assert data_fingerprint(Vectorised(ids, mask)) != a
    # Bare tensors could be a text classifier's inputs: only the named task makes them tokens.
    fp = data_fingerprint(MIXED, tokens=True)
    assert fp == data_fingerprint(Items(MIXED), tokens=True)
    assert fp != data_fingerprint(Items(MIXED[:3]), tokens=True)


def test_classifier_fingerprint_is_unchanged():
    # The bytes of today's stores: a change here orphans every store's recorded fingerprint.
    assert data_fingerprint(ToyData(50)) == data_fingerprint(ToyData(50), tokens=False)
    x, y = get_batch(ToyData(50), np.arange(4))
    assert isinstance(x, torch.Tensor) and x.shape[0] == 4 and y.dtype == np.int64
