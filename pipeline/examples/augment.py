"""Built-in seeded augmentations: `augment(x, generator, **args) -> x'`, one sample at a time.

Every random number comes from the `torch.Generator` passed in, so the same generator state gives
the same output bit for bit: what `kdcache precompute --views V --augment SPEC` needs for stage
two to re-create the exact view the teacher saw. Use them as
`--augment kdcache.pipeline.examples.augment:signal_1d --augment-arg max_shift=4`.

- `signal_1d`: 1-D signals `(L,)` or `(C, L)` such as MNIST-1D: a random shift (edge values
  repeated), a random amplitude scale and Gaussian noise. It has a `batch(x, generators)`
  attribute: the same views of a whole batch at once (see `kdcache.pipeline.specs.augmentation`).
- `resized_crop_flip`: images `(C, H, W)`: a random resized crop (torchvision's
  RandomResizedCrop sampling, in torch ops, no torchvision) and a random horizontal flip, the pair
  FKD stores per crop.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _signal_draws(generator: torch.Generator, shape) -> tuple[np.ndarray, np.ndarray]:
    u = torch.rand(2, generator=generator, dtype=torch.float64).numpy()
    return u, torch.randn(shape, generator=generator, dtype=torch.float32).numpy()


def _signal_apply(a: np.ndarray, u: np.ndarray, eps: np.ndarray, max_shift, scale, noise):
    """The signals `a` (..., L) with their draws `u` (..., 2) and `eps` (the shape of `a`)."""
    length = a.shape[-1]
    shift = np.minimum((u[..., 0] * (2 * max_shift + 1)).astype(np.int64), 2 * max_shift)
    index = np.clip(np.arange(length) - (shift - max_shift)[..., None], 0, length - 1)
    if a.ndim > index.ndim:  # channels: one shift for all of a sample's channels
        index = np.broadcast_to(index[..., None, :], a.shape)
    factor = (1.0 - scale + 2.0 * scale * u[..., 1]).astype(a.dtype)
    factor = factor.reshape(factor.shape + (1,) * (a.ndim - factor.ndim))
    shifted = np.take_along_axis(a, index, axis=-1)
    return shifted * factor + a.dtype.type(noise) * eps.astype(a.dtype)


def signal_1d(
    x: torch.Tensor,
    generator: torch.Generator,
    max_shift: int = 4,
    scale: float = 0.15,
    noise: float = 0.05,
) -> torch.Tensor:
    """Shift by an integer in [-max_shift, max_shift] (the edge values fill the gap), scale the
    amplitude by a factor in [1 - scale, 1 + scale], add N(0, noise^2) per value."""
    u, eps = _signal_draws(generator, x.shape)
    a = x.detach().cpu().numpy()
    return torch.from_numpy(_signal_apply(a, u, eps, max_shift, scale, noise))


def _signal_1d_batch(x: torch.Tensor, generators, max_shift=4, scale=0.15, noise=0.05):
    """`signal_1d` of every row of `x` with its own generator, bit for bit, in one pass: the same
    draws in the same order, the arithmetic vectorised (a 40-value signal costs less than the
    calls, and stage two replays one view per sample every epoch)."""
    draws = [_signal_draws(g, x.shape[1:]) for g in generators]
    u = np.stack([d[0] for d in draws])
    eps = np.stack([d[1] for d in draws])
    a = x.detach().cpu().numpy()
    return torch.from_numpy(_signal_apply(a, u, eps, max_shift, scale, noise))


signal_1d.batch = _signal_1d_batch


def crop_box(height: int, width: int, generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(top, left, h, w) of a random crop covering `scale` of the area at an aspect ratio in
    `ratio` (log-uniform); after 10 misses the largest central crop within `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop_flip(
    x: torch.Tensor,
    generator: torch.Generator,
    size: int | list | None = None,
    scale: list | tuple = (0.08, 1.0),
    ratio: list | tuple = (3 / 4, 4 / 3),
    flip: float = 0.5,
) -> torch.Tensor:
    """A random resized crop of a `(C, H, W)` image to `size` (int or [h, w]; default the input's
    own), bilinear with antialiasing, then a horizontal flip with probability `flip`."""
    if x.dim() != 3:
        raise ValueError(f"resized_crop_flip takes (C, H, W) images, got shape {tuple(x.shape)}")
    _, height, width = x.shape
    out_size = (height, width) if size is None else size
    if isinstance(out_size, int):
        out_size = (out_size, out_size)
    top, left, h, w = crop_box(height, width, generator, tuple(scale), tuple(ratio))
    crop = x[:, top : top + h, left : left + w]
    work = crop if crop.is_floating_point() else crop.float()
    out = F.interpolate(
        work[None], size=tuple(out_size), mode="bilinear", align_corners=False, antialias=True
    )[0]
    if not crop.is_floating_point():
        info = torch.iinfo(crop.dtype)
        out = out.round().clamp(info.min, info.max).to(crop.dtype)
    if float(torch.rand((), generator=generator)) < flip:
        out = out.flip(-1)
    return out
