"""Built-in seeded augmentations: `augment(x, generator, **args) -> x'`, one sample at a time.

Every random number comes from the `torch.Generator` passed in, so the same generator state gives
the same output bit for bit: what `kdcache precompute --views V --augment SPEC` needs for stage
two to re-create the exact view the teacher saw. Use them as
`--augment kdcache.pipeline.examples.augment:signal_1d --augment-arg max_shift=4`.

- `signal_1d`: 1-D signals `(L,)` or `(C, L)` such as MNIST-1D: a random shift (edge values
  repeated), a random amplitude scale and Gaussian noise.
- `resized_crop_flip`: images `(C, H, W)`: a random resized crop (torchvision's
  RandomResizedCrop sampling, in torch ops, no torchvision) and a random horizontal flip, the pair
  FKD stores per crop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def signal_1d(
    x: torch.Tensor,
    generator: torch.Generator,
    max_shift: int = 4,
    scale: float = 0.15,
    noise: float = 0.05,
) -> torch.Tensor:
    """Shift by an integer in [-max_shift, max_shift] (the edge values fill the gap), scale the
    amplitude by a factor in [1 - scale, 1 + scale], add N(0, noise^2) per value."""
    length = x.shape[-1]
    shift = int(torch.randint(-max_shift, max_shift + 1, (), generator=generator))
    index = (torch.arange(length) - shift).clamp(0, length - 1)
    factor = _uniform(generator, 1.0 - scale, 1.0 + scale)
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.dtype)
    return x[..., index] * factor + noise * eps


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
