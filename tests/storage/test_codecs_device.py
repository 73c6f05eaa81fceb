"""The codecs' device encoders: topk's statistics from its k values and one logsumexp agree with
the full-vocabulary reference, its logsumexp is torch's bit for bit, and columns leave at their
stored widths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.storage.codecs import open_codec
from kdcache.storage.codecs.topk import topk_kl_cost, topk_stats


@pytest.mark.parametrize("k", [1, 16, 300])
def test_topk_stats_match_the_full_vocabulary_reference(k):
    s = torch.randn(64, 3000, generator=torch.Generator().manual_seed(k)) * 4
    vals, idx = torch.topk(s, k, 1)
    lse, kl, r = topk_stats(s, vals, idx)
    assert torch.equal(lse, torch.logsumexp(s, 1))  # the stored column keeps its bytes
    ref_kl, ref_r = topk_kl_cost(s, idx, lse)
    torch.testing.assert_close(r, ref_r, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(kl, ref_kl, atol=1e-4, rtol=1e-3)


def test_topk_non_finite_logits_show_in_the_finite_flag_and_the_widths_are_stored_ones():
    codec = open_codec(
        {"codec": "topk", "dtype": "float16", "top_k": 4, "num_classes": 3000}, "causal-lm"
    )
    s = torch.randn(5, 3000)
    s[1, 9], s[3, 0] = float("nan"), float("inf")
    cols, stats, finite = codec.encode_device(s.clone(), None)
    assert finite.tolist() == [True, False, True, False, True]
    assert cols["topk_indices"].dtype == torch.uint16
    assert cols["topk_logits"].dtype == torch.float16
    assert all(v.dim() == 0 for v in stats.values())


def test_dense_casts_on_the_device_to_its_stored_dtype():
    codec = open_codec({"codec": "dense", "dtype": "float16", "num_classes": 7}, "causal-lm")
    s = torch.randn(3, 7)
    cols, _, finite = codec.encode_device(s, None)
    assert cols["logits"].dtype == torch.float16 and finite.all()
    np.testing.assert_array_equal(cols["logits"].numpy(), s.numpy().astype(np.float16))


def test_wide_ids_travel_signed_off_the_cpu_and_come_back_unsigned():
    import pyarrow as pa

    from kdcache.storage.codecs.base import torch_dtype

    assert torch_dtype(pa.uint16()) == torch_dtype(pa.uint16(), "cpu") == torch.uint16
    assert torch_dtype(pa.uint16(), "cuda") == torch.int16
    assert torch_dtype(pa.uint32(), "mps") == torch.int32
    assert torch_dtype(pa.uint8(), "cuda") == torch.uint8
    ids = torch.tensor([0, 40000, 65535]).to(torch.int16).numpy()
    codec = open_codec(
        {"codec": "sampled", "dtype": "float16", "samples": 2, "sample_seed": 0,
         "num_classes": 65536, "sampler": 2}, "causal-lm",
    )  # fmt: skip
    cols = codec.finish({"draws": ids.reshape(-1, 1)})
    assert codec.token_arrays(cols)[1].to_pylist() == [0, 40000, 65535]
