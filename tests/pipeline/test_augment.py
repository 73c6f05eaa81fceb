"""The built-in augmentations: deterministic under a seeded generator, and doing what they say."""

from __future__ import annotations

import pytest
import torch

from kdcache.pipeline.examples.augment import crop_box, resized_crop_flip, signal_1d
from kdcache.pipeline.specs import augmentation
from kdcache.storage.errors import UsageError
from kdcache.storage.views import row_generator

SIGNAL = torch.linspace(-1, 1, 40)
IMAGE = torch.arange(3 * 24 * 32, dtype=torch.float32).reshape(3, 24, 32) / 100


def _views(fn, x, n=20, **kwargs):
    return [fn(x, row_generator(0, i, 0), **kwargs) for i in range(n)]


@pytest.mark.parametrize(
    ("fn", "x", "kwargs"),
    [
        (signal_1d, SIGNAL, {}),
        (signal_1d, SIGNAL.expand(2, 40).clone(), {"max_shift": 8}),
        (resized_crop_flip, IMAGE, {}),
        (resized_crop_flip, IMAGE, {"size": 16, "scale": [0.5, 1.0]}),
        (resized_crop_flip, (IMAGE * 10).to(torch.uint8), {"size": [8, 12]}),
    ],
)
def test_same_generator_same_bits_other_seed_other_view(fn, x, kwargs):
    a, b = _views(fn, x, **kwargs), _views(fn, x, **kwargs)
    assert all(torch.equal(p, q) and p.dtype == x.dtype for p, q in zip(a, b, strict=True))
    # The global RNG plays no part: reseeding it changes nothing.
    torch.manual_seed(123)
    assert all(torch.equal(p, q) for p, q in zip(a, _views(fn, x, **kwargs), strict=True))
    distinct = {p.numpy().tobytes() for p in a}
    assert len(distinct) == len(a)


def test_signal_1d_shifts_scales_and_adds_noise():
    step = torch.zeros(40)
    step[20:] = 1.0
    quiet = _views(signal_1d, step, n=50, noise=0.0, scale=0.0, max_shift=3)
    edges = {int((v > 0.5).nonzero()[0]) for v in quiet}
    assert edges <= set(range(17, 24)) and len(edges) > 3  # shifted by -3..3, several ways
    assert all(set(v.unique().tolist()) <= {0.0, 1.0} for v in quiet)  # edges repeated, no wrap
    scaled = _views(signal_1d, step, n=50, noise=0.0, scale=0.2, max_shift=0)
    peaks = torch.stack([v.max() for v in scaled])
    assert 0.8 <= peaks.min() < 0.95 and 1.05 < peaks.max() <= 1.2
    noisy = _views(signal_1d, torch.zeros(4000), n=1, noise=0.1, scale=0.0, max_shift=0)[0]
    assert noisy.std().item() == pytest.approx(0.1, rel=0.1)


def test_resized_crop_flip_crops_resizes_and_flips():
    ramp = torch.arange(32, dtype=torch.float32).expand(1, 24, 32).clone()
    out = _views(resized_crop_flip, ramp, n=60, scale=[0.2, 0.5])
    assert all(v.shape == (1, 24, 32) for v in out)
    rising = [bool(v[0, 0, -1] > v[0, 0, 0]) for v in out]
    assert 10 < sum(rising) < 50  # about half are flipped
    spans = [float((v.max() - v.min()).abs()) for v in out]
    assert max(spans) < 31  # a crop of at most half the area never spans the whole ramp
    whole = resized_crop_flip(
        ramp, row_generator(0, 0, 0), scale=[1, 1], ratio=[4 / 3, 4 / 3], flip=0
    )
    assert torch.allclose(whole, ramp)  # the full frame at its own ratio is the identity


def test_crop_box_stays_inside_the_image():
    for i in range(200):
        top, left, h, w = crop_box(24, 32, row_generator(1, i, 0))
        assert top >= 0 and left >= 0 and h > 0 and w > 0
        assert top + h <= 24 and left + w <= 32
    # Impossible ratios fall back to the largest central crop within them.
    top, left, h, w = crop_box(10, 100, row_generator(0, 0, 0), scale=(1, 1), ratio=(1, 1))
    assert (top, h) == (0, 10) and w == round(10 * 1) and left == (100 - w) // 2


def test_specs_bind_arguments_and_refuse_non_callables():
    fn = augmentation("kdcache.pipeline.examples.augment:signal_1d", {"max_shift": 0, "noise": 0})
    ratio = fn(SIGNAL, row_generator(0, 0, 0)) / SIGNAL  # bound: no shift, no noise, a scale
    assert torch.allclose(ratio, ratio[0].expand(40)) and ratio[0] != 1
    assert augmentation(None, {}) is None
    with pytest.raises(UsageError, match="not a callable"):
        augmentation("kdcache.pipeline.examples.augment:__doc__", {})


@pytest.mark.parametrize("shape", [(50, 40), (20, 3, 40)])
def test_signal_1d_batch_is_the_same_bits_as_one_sample_at_a_time(shape):
    fn = augmentation("kdcache.pipeline.examples.augment:signal_1d", {"max_shift": 6})
    x = torch.randn(shape)
    gens = lambda: [row_generator(4, i, 1) for i in range(shape[0])]  # noqa: E731
    one_by_one = torch.stack([fn(x[j], g) for j, g in enumerate(gens())])
    assert torch.equal(fn.batch(x, gens()), one_by_one)
    assert not torch.equal(one_by_one[0], one_by_one[1])
