"""Distillation losses against straightforward references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.stages.tasks.regression import mse
from kdcache.stages.train.loss import feature_loss, hard_loss
from kdcache.storage.codecs.dense import soft_loss_dense
from kdcache.storage.codecs.losses import retemper
from kdcache.storage.codecs.topk import soft_loss_topk

B, C = 6, 10
TEMPS = [(1.0, 1.0), (2.0, 2.0), (2.0, 1.0), (1.0, 4.0), (3.0, 0.5)]  # (stored_T, T)


def _logits(seed, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, generator=g, dtype=dtype) * scale


def _store_topk(z_teacher, stored_T, k):
    """What stage one writes: top-k of s = z / T_store (sorted descending) and lse(s)."""
    s = z_teacher / stored_T
    values, indices = torch.topk(s, k, dim=-1)
    return indices, values, s.logsumexp(dim=-1)


def _kl_ref(p, q):
    return (p * (torch.log(p) - torch.log(q))).sum(-1).mean()


def _bucket_kl_ref(z_teacher, z_student, indices, T):
    """Exact (k+1)-bucket KL from full logits, both sides at temperature T."""
    p, q = torch.softmax(z_teacher / T, -1), torch.softmax(z_student / T, -1)
    p_k, q_k = p.gather(-1, indices), q.gather(-1, indices)
    p_b = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    return T**2 * _kl_ref(p_b, q_b)


@pytest.mark.parametrize(("stored_T", "T"), TEMPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_matches_reference(stored_T, T, dtype):
    z_t, z_s = _logits(0, dtype), _logits(1, dtype)
    got = soft_loss_dense(z_s, z_t / stored_T, stored_T, T)
    ref = T**2 * _kl_ref(torch.softmax(z_t / T, -1), torch.softmax(z_s / T, -1))
    assert got.dtype == dtype
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("stored_T", "T"), TEMPS)
def test_retemper_recovers_raw_logits(stored_T, T):
    z_t, z_s = _logits(2), _logits(3)
    stored = z_t / stored_T
    torch.testing.assert_close(retemper(stored, stored_T, T), z_t / T)
    # Loss from stored values at T equals the loss from raw logits (stored_T = 1) at T.
    torch.testing.assert_close(
        soft_loss_dense(z_s, stored, stored_T, T), soft_loss_dense(z_s, z_t, 1.0, T)
    )
    assert retemper(stored.half(), stored_T, T).dtype == torch.float32


@pytest.mark.parametrize(("stored_T", "T"), TEMPS)
def test_topk_with_all_classes_equals_dense(stored_T, T):
    z_t, z_s = _logits(4), _logits(5)
    idx, vals, lse = _store_topk(z_t, stored_T, C)
    # torch.topk's indices are a per-row permutation, so the gather/scatter paths are exercised.
    assert not torch.equal(idx, torch.arange(C).expand(B, C))
    got = soft_loss_topk(z_s, idx, vals, lse, stored_T, T)
    torch.testing.assert_close(got, soft_loss_dense(z_s, z_t / stored_T, stored_T, T))


@pytest.mark.parametrize("k", [1, 3, 9])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_topk_is_exact_at_stored_temperature(k, T):
    z_t, z_s = _logits(6), _logits(7)
    idx, vals, lse = _store_topk(z_t, T, k)
    got = soft_loss_topk(z_s, idx, vals, lse, T, T)
    torch.testing.assert_close(got, _bucket_kl_ref(z_t, z_s, idx, T), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("stored_T", "T"), [(2.0, 1.0), (1.0, 4.0)])
def test_topk_retemper_exact_when_tail_logits_are_equal(stored_T, T):
    # The documented approximation assumes the C-k unstored logits are equal; when they are,
    # re-tempering must be exact at any temperature.
    k = 4
    z_t = _logits(8)
    top = torch.topk(z_t, k, dim=-1)
    in_top = torch.zeros_like(z_t, dtype=torch.bool).scatter(-1, top.indices, True)
    z_t = torch.where(in_top, z_t, top.values[:, -1:] - 1.0)
    z_s = _logits(9)
    idx, vals, lse = _store_topk(z_t, stored_T, k)
    got = soft_loss_topk(z_s, idx, vals, lse, stored_T, T)
    torch.testing.assert_close(got, _bucket_kl_ref(z_t, z_s, idx, T), rtol=1e-6, atol=1e-9)


def _documented_retemper_ref(z_student, idx, vals, lse, stored_T, T):
    """docs/FORMAT.md's k + 1 buckets, written out: the C - k unstored logits share
    s_r = lse + log(r / (C - k)) (which gives mass r at the stored T); every stored value is
    scaled by stored_T / T and the k stored classes plus the C - k tail ones are normalised
    jointly; the student's buckets are its k probabilities at T and the rest of its mass."""
    k = idx.shape[-1]
    r = (-torch.expm1(vals.logsumexp(-1) - lse)).clamp_min(0)
    s_r = lse + torch.log(r / (C - k))
    scale = stored_T / T
    head, tail = vals * scale, (s_r * scale)[:, None]
    norm = torch.cat([head, tail + math.log(C - k)], -1).logsumexp(-1, keepdim=True)
    log_p = torch.cat([head, tail + math.log(C - k)], -1) - norm
    q = torch.softmax(z_student / T, -1)
    q_k = q.gather(-1, idx)
    log_q = torch.log(torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1))
    p = log_p.exp()
    return T**2 * torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1).mean()


@pytest.mark.parametrize(("stored_T", "T"), [(1.0, 4.0), (3.0, 0.5), (2.0, 1.0)])
def test_topk_retemper_is_an_approximation_otherwise(stored_T, T):
    z_t, z_s = _logits(10), _logits(11)
    idx, vals, lse = _store_topk(z_t, stored_T, 3)
    got = soft_loss_topk(z_s, idx, vals, lse, stored_T, T)
    # Exactly the documented approximation ...
    want = _documented_retemper_ref(z_s, idx, vals, lse, stored_T, T)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # ... which is not the exact bucket KL at T once the tail logits differ.
    assert not torch.allclose(got, _bucket_kl_ref(z_t, z_s, idx, T), rtol=1e-3)


def test_topk_accepts_lse_column_and_half_storage():
    z_t, z_s = _logits(12, torch.float32), _logits(13, torch.float32)
    idx, vals, lse = _store_topk(z_t, 2.0, 3)
    full = soft_loss_topk(z_s, idx, vals, lse, 2.0, 1.0)
    torch.testing.assert_close(soft_loss_topk(z_s, idx, vals, lse[:, None], 2.0, 1.0), full)
    half = soft_loss_topk(z_s, idx.int(), vals.half(), lse.half(), 2.0, 1.0)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=2e-2, atol=2e-2)
    dense_half = soft_loss_dense(z_s, (z_t / 2.0).half(), 2.0, 1.0)
    torch.testing.assert_close(
        dense_half, soft_loss_dense(z_s, z_t / 2.0, 2.0, 1.0), rtol=2e-2, atol=2e-2
    )


def test_topk_residual_clamped_and_no_nan():
    z_s = _logits(14, torch.float32).requires_grad_()
    # float16 rounding makes the stored top-k mass exceed 1: the residual must clamp to 0.
    vals = torch.tensor([[0.0, -30.0]] * B).half()
    lse = torch.full((B,), -1e-3).half()
    idx = torch.tensor([[2, 5]] * B)
    for T in (1.0, 3.0):
        loss = soft_loss_topk(z_s, idx, vals, lse, 1.0, T)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z_s.grad).all()
        z_s.grad = None


@pytest.mark.parametrize("k", [3, C])
@pytest.mark.parametrize(("stored_T", "T"), [(1.0, 1.0), (2.0, 0.5)])
def test_soft_gradients_flow(k, stored_T, T):
    z_t = _logits(15, torch.float32)
    z_s = _logits(16, torch.float32).requires_grad_()
    idx, vals, lse = _store_topk(z_t, stored_T, k)
    for loss in (
        soft_loss_topk(z_s, idx, vals.half(), lse.half(), stored_T, T),
        soft_loss_dense(z_s, z_t / stored_T, stored_T, T),
    ):
        (grad,) = torch.autograd.grad(loss, z_s)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_soft_loss_is_zero_when_student_matches_teacher():
    z = _logits(17)
    idx, vals, lse = _store_topk(z, 2.0, 3)
    assert soft_loss_topk(z, idx, vals, lse, 2.0, 2.0).abs() < 1e-12
    assert soft_loss_dense(z, z / 2.0, 2.0, 5.0).abs() < 1e-12


def test_hard_loss_ignores_missing_labels():
    z = _logits(18, torch.float32).requires_grad_()
    labels = torch.tensor([3, -1, 0, -1, 9, -1])
    mask = labels >= 0
    torch.testing.assert_close(hard_loss(z, labels), F.cross_entropy(z[mask], labels[mask]))
    # Changing unlabeled rows must not change the loss.
    z2 = z.detach().clone()
    z2[~mask] += torch.randn(3, C) * 5
    torch.testing.assert_close(hard_loss(z2, labels), hard_loss(z.detach(), labels))


def test_hard_loss_without_labels_is_zero_and_connected():
    z = _logits(19, torch.float32).requires_grad_()
    loss = hard_loss(z, torch.full((B,), -1))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_feature_and_regression_losses():
    g = torch.Generator().manual_seed(20)
    student = torch.randn(B, 16, generator=g, requires_grad=True)
    teacher = torch.randn(B, 16, generator=g).half()
    got = feature_loss(student, teacher)
    torch.testing.assert_close(got, ((student - teacher.float()) ** 2).mean())
    got.backward()
    assert torch.isfinite(student.grad).all()
    with pytest.raises(ValueError, match="shapes differ"):
        feature_loss(student, teacher[:, :8])
    pred, target = torch.randn(B, generator=g), torch.randn(B, generator=g)
    torch.testing.assert_close(mse(pred, target), ((pred - target) ** 2).mean())
    with pytest.raises(ValueError, match="shapes differ"):
        mse(pred[:, None], target[1:])


def test_bad_temperature_rejected():
    z = _logits(21)
    with pytest.raises(ValueError, match="T must be > 0"):
        soft_loss_dense(z, z, 1.0, 0.0)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(1, C),
    stored_T=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    T=st.sampled_from([0.5, 1.0, 2.0, 8.0]),
    scale=st.sampled_from([0.01, 1.0, 10.0, 50.0]),
    half=st.booleans(),
)
def test_topk_loss_nonnegative_and_finite(seed, k, stored_T, T, scale, half):
    z_t, z_s = _logits(seed, torch.float32, scale), _logits(seed + 1, torch.float32, scale)
    idx, vals, lse = _store_topk(z_t, stored_T, k)
    if half:
        vals, lse = vals.half(), lse.half()
    loss = soft_loss_topk(z_s, idx, vals, lse, stored_T, T)
    assert torch.isfinite(loss)
    # KL between two normalised distributions; allow float32 rounding only.
    assert loss >= -1e-5 * max(1.0, T**2)
    dense = soft_loss_dense(z_s, z_t / stored_T, stored_T, T)
    if k == C and not half:
        assert math.isclose(loss.item(), dense.item(), rel_tol=1e-4, abs_tol=1e-4)
