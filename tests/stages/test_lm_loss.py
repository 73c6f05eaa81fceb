"""The chunked causal-lm loss against the plain one it replaces (golden equality, values and
gradients, fp32 to 1e-5): every codec, T = 1 and T != 1, padded rows, chunk sizes, CE only, and the
fused output layer against the unfused loss."""

from __future__ import annotations

import pytest
import torch

from kdcache.stages.tasks import causal_lm as lm
from kdcache.stages.tasks import lm_loss
from kdcache.storage.codecs import open_codec
from kdcache.storage.codecs.sampled import draw
from kdcache.storage.errors import UsageError

V, H, N = 50, 12, 20
LENGTHS = (7, 3, 9, 1, 5)


def reference(z, x, codec, stored, stored_T, T, alpha):
    """The loss as stage two computed it before the chunked one (stages/train/trainer.py's terms)."""
    hard = lm.next_token_loss(z, x["input_ids"], x["attention_mask"])
    soft = codec.soft_loss(lm.valid_tokens(z, x["attention_mask"]), stored, stored_T, T)
    return alpha * soft + (1 - alpha) * hard, hard, soft


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.int64)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1  # right padding, as the loader pads
    ids = torch.randint(0, V, mask.shape, generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask}, g


def stored_columns(name, s, g):
    """What stage one stores for tempered teacher logits `s` (tokens, V)."""
    settings = {"codec": name, "dtype": "float32", "num_classes": V, "top_k": 6, "samples": N}
    codec = open_codec(settings, "causal-lm")
    if name == "sampled":
        ids, counts, per = draw(torch.softmax(s, -1), N, g)
        return codec, {"sampled_n": per, "sampled_ids": ids, "sampled_counts": counts}
    cols, _ = codec.encode(s)
    return codec, {k: torch.as_tensor(v) for k, v in cols.items()}


CASES = [("sampled", 1.0, 1.0), ("sampled", 2.0, 2.0), ("topk", 1.0, 1.0), ("topk", 2.0, 1.0),
         ("topk", 1.0, 3.0), ("dense", 1.0, 1.0), ("dense", 4.0, 2.0)]  # fmt: skip


@pytest.mark.parametrize(("codec", "stored_T", "T"), CASES)
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_equals_the_plain_loss(codec, stored_T, T, chunk):
    x, g = batch()
    z = (torch.randn(*x["input_ids"].shape, V, generator=g) * 2).requires_grad_()
    s = torch.randn(int(x["attention_mask"].sum()), V, generator=g) * 3 / stored_T
    codec_obj, stored = stored_columns(codec, s, g)
    alpha = 0.7
    want, want_hard, want_soft = reference(z, x, codec_obj, stored, stored_T, T, alpha)
    (want_grad,) = torch.autograd.grad(want, z)

    pos = lm_loss.positions(x["input_ids"], x["attention_mask"])
    targets = codec_obj.token_targets(stored, stored_T, T, V)
    got, hard, soft = lm_loss.causal_lm_loss(z, pos, targets, T, 1 - alpha, alpha, chunk)
    (grad,) = torch.autograd.grad(got, z)
    for a, b in ((got, want), (hard, want_hard), (soft, want_soft), (grad, want_grad)):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    assert not hard.requires_grad and not soft.requires_grad
    # Padding gets no gradient; the chunked loss reads only valid positions.
    assert grad[~x["attention_mask"].bool()].abs().max() == 0


def test_ce_only_and_a_scaled_loss():
    x, g = batch(1)
    z = torch.randn(*x["input_ids"].shape, V, generator=g).requires_grad_()
    want = lm.next_token_loss(z, x["input_ids"], x["attention_mask"])
    (want_grad,) = torch.autograd.grad(3 * want, z)
    pos = lm_loss.positions(x["input_ids"], x["attention_mask"])
    got, hard, soft = lm_loss.causal_lm_loss(z, pos, None, 1.0, 1.0, 0.0, 5)
    (grad,) = torch.autograd.grad(3 * got, z)  # the incoming gradient scales the chunks'
    torch.testing.assert_close(got, want.detach())
    torch.testing.assert_close(grad, want_grad)
    assert soft == 0 and pos.pairs == sum(n - 1 for n in LENGTHS) and pos.tokens == sum(LENGTHS)


class Head(torch.nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        torch.manual_seed(3)
        self.lin = torch.nn.Linear(H, V, bias=bias)


@pytest.mark.parametrize(("codec", "stored_T", "T"), [("sampled", 1.0, 1.0), ("topk", 2.0, 1.0),
                                                      ("dense", 1.0, 2.0)])  # fmt: skip
@pytest.mark.parametrize("bias", [True, False])
def test_fused_head_equals_the_unfused_loss(codec, stored_T, T, bias):
    x, g = batch(2)
    lin = Head(bias).lin
    h = torch.randn(*x["input_ids"].shape, H, generator=g, requires_grad=True)
    s = torch.randn(int(x["attention_mask"].sum()), V, generator=g) / stored_T
    codec_obj, stored = stored_columns(codec, s, g)
    pos = lm_loss.positions(x["input_ids"], x["attention_mask"])
    targets = codec_obj.token_targets(stored, stored_T, T, V)
    params = [h, *lin.parameters()]
    want = reference(lin(h), x, codec_obj, stored, stored_T, T, 0.6)
    want_grads = torch.autograd.grad(want[0], params)
    got = lm_loss.causal_lm_loss(h, pos, targets, T, 0.4, 0.6, 4, head=lin)
    grads = torch.autograd.grad(got[0], params)
    for a, b in zip((*got, *grads), (*want, *want_grads), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_fused_head_without_grad_makes_none():
    x, g = batch(3)
    lin = Head(True).lin
    h = torch.randn(*x["input_ids"].shape, H, generator=g)
    pos = lm_loss.positions(x["input_ids"], x["attention_mask"])
    with torch.no_grad():
        loss, hard, _ = lm_loss.causal_lm_loss(h, pos, None, 1.0, 1.0, 0.0, 3, head=lin)
    want = lm.next_token_loss(lin(h), x["input_ids"], x["attention_mask"])
    torch.testing.assert_close(hard, want.detach())


def test_a_chunk_smaller_than_one_token_is_refused():
    assert lm_loss.chunk_tokens(1.0, 32768) == 8
    with pytest.raises(UsageError, match=r"--loss-chunk-mb 0.1 holds less than one token.*raise"):
        lm_loss.chunk_tokens(0.1, 1 << 20)


def test_a_teacher_that_rules_out_classes_and_a_peaked_student_match_the_plain_loss():
    """Dense: classes at logit -inf (p = 0) add nothing, never NaN. Topk: a student whose top-k
    holds all but ~1e-40 of its mass (every unstored q underflows in float32: the residual must
    be taken in log space, as both losses do): the same values and gradients."""
    x, g = batch(4)
    n = int(x["attention_mask"].sum())
    for codec, scale in (("dense", 2.0), ("topk", 2.0), ("topk", 30.0)):
        s = torch.randn(n, V, generator=g) * 3
        if codec == "dense":
            s[:, ::7] = float("-inf")
        codec_obj, stored = stored_columns(codec, s, g)
        # The student ranks the teacher's classes as the teacher does, `scale` times sharper.
        z = torch.zeros(*x["input_ids"].shape, V)
        z[x["attention_mask"].bool()] = torch.nan_to_num(s, neginf=-50.0) * scale
        z.requires_grad_()
        want = reference(z, x, codec_obj, stored, 1.0, 1.0, 0.7)
        (want_grad,) = torch.autograd.grad(want[0], z)
        pos = lm_loss.positions(x["input_ids"], x["attention_mask"])
        targets = codec_obj.token_targets(stored, 1.0, 1.0, V)
        got = lm_loss.causal_lm_loss(z, pos, targets, 1.0, 0.3, 0.7, 4)
        (grad,) = torch.autograd.grad(got[0], z)
        assert torch.isfinite(got[0]) and torch.isfinite(grad).all(), codec
        for a, b in zip((*got, grad), (*want, want_grad), strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
