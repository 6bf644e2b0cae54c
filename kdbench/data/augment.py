"""Batched image augmentation as tensor operations on ``(N, C, H, W)`` batches.

Every function works on the batch where it lies (CPU or GPU), draws one random choice per sample
with whole-batch tensor ops (no Python loop over the samples), and takes its randomness from an
optional ``torch.Generator``; without one it uses the global RNG of the batch's device, so
``lightning.seed_everything`` (or ``torch.manual_seed``) makes a run repeatable.

``random_crop``, ``random_flip`` and ``center_crop`` accept any dtype (uint8 included);
``random_resized_crop`` and ``normalize`` need floating-point input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Size = int | tuple[int, int]


def _pair(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _check_batch(x: torch.Tensor, fn: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{fn} takes a batch of shape (N, C, H, W), got {tuple(x.shape)}")


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``n`` uniform numbers in [0, 1) on ``device``, drawn from ``generator`` (on its own
    device) or from the global RNG of ``device``."""
    where = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=where).to(device)


def _randint(
    high: int, n: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    where = generator.device if generator is not None else device
    return torch.randint(high, (n,), generator=generator, device=where).to(device)


def _windows(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int):
    """The ``h x w`` window of each sample ``n`` that starts at ``(top[n], left[n])``."""
    n, c = x.shape[:2]
    dev = x.device
    rows = (top[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (N, 1, h, 1)
    cols = (left[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (N, 1, 1, w)
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return x[batch, chan, rows, cols]


def random_crop(
    x: torch.Tensor, size: Size, padding: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A random ``size`` window of each sample after zero-padding ``padding`` pixels on every
    side; the offset is drawn independently (uniformly) for every sample."""
    _check_batch(x, "random_crop")
    h, w = _pair(size)
    if padding < 0:
        raise ValueError(f"random_crop: padding must be >= 0, got {padding}")
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
    H, W = x.shape[-2:]
    if h > H or w > W:
        raise ValueError(f"random_crop: crop {h}x{w} is larger than the padded image {H}x{W}")
    n = x.shape[0]
    top = _randint(H - h + 1, n, generator, x.device)
    left = _randint(W - w + 1, n, generator, x.device)
    return _windows(x, top, left, h, w)


def random_flip(
    x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mirror each sample left-right with probability ``p``, independently."""
    _check_batch(x, "random_flip")
    flip = _rand(x.shape[0], generator, x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def center_crop(x: torch.Tensor, size: Size) -> torch.Tensor:
    """The central ``size`` window (offsets rounded as torchvision does)."""
    _check_batch(x, "center_crop")
    h, w = _pair(size)
    H, W = x.shape[-2:]
    if h > H or w > W:
        raise ValueError(f"center_crop: crop {h}x{w} is larger than the image {H}x{W}")
    top, left = int(round((H - h) / 2.0)), int(round((W - w) / 2.0))
    return x[..., top : top + h, left : left + w]


def random_resized_crop(
    x: torch.Tensor,
    size: Size,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> torch.Tensor:
    """Inception-style crop: for each sample a box of ``scale`` times the image area and aspect
    ratio (width / height) log-uniform in ``ratio``, at a uniform position, resampled
    (bilinearly, without antialiasing) to ``size``.

    As in torchvision, up to ``attempts`` boxes are drawn per sample and the first that fits in
    the image is taken; a sample with none gets the largest central box whose ratio is within
    ``ratio``.
    """
    _check_batch(x, "random_resized_crop")
    if not x.is_floating_point():
        raise ValueError(f"random_resized_crop needs a floating-point batch, got {x.dtype}")
    oh, ow = _pair(size)
    n, c, H, W = x.shape
    dev = x.device
    area = H * W
    k = n * attempts
    target = area * (scale[0] + (scale[1] - scale[0]) * _rand(k, generator, dev))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * _rand(k, generator, dev))
    bw = torch.round(torch.sqrt(target * aspect)).view(n, attempts)
    bh = torch.round(torch.sqrt(target / aspect)).view(n, attempts)
    fits = (bw > 0) & (bw <= W) & (bh > 0) & (bh <= H)
    first = torch.argmax(fits.int(), dim=1, keepdim=True)  # first fitting attempt (0 if none)
    found = fits.any(dim=1)
    bw, bh = bw.gather(1, first).squeeze(1), bh.gather(1, first).squeeze(1)

    # fallback: a central box with the aspect ratio clamped into ``ratio``
    in_ratio = W / H
    if in_ratio < min(ratio):
        fw, fh = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(H * max(ratio))), H
    else:
        fw, fh = W, H
    bw = torch.where(found, bw, torch.full_like(bw, fw))
    bh = torch.where(found, bh, torch.full_like(bh, fh))
    # uniform integer offsets in [0, W - bw] and [0, H - bh]; central for the fallback
    left = torch.floor(_rand(n, generator, dev) * (W - bw + 1)).clamp(max=W - bw)
    top = torch.floor(_rand(n, generator, dev) * (H - bh + 1)).clamp(max=H - bh)
    left = torch.where(found, left, torch.full_like(left, (W - fw) // 2))
    top = torch.where(found, top, torch.full_like(top, (H - fh) // 2))

    # affine grid (align_corners=False: -1 and 1 are the outer pixel edges) mapping the output
    # onto the box; "border" clamps samples at the box edge like torchvision's resize does
    dtype = x.dtype
    theta = torch.zeros(n, 2, 3, device=dev, dtype=dtype)
    theta[:, 0, 0] = (bw / W).to(dtype)
    theta[:, 0, 2] = ((2 * left + bw) / W - 1).to(dtype)
    theta[:, 1, 1] = (bh / H).to(dtype)
    theta[:, 1, 2] = ((2 * top + bh) / H - 1).to(dtype)
    grid = F.affine_grid(theta, [n, c, oh, ow], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel (axis 1)."""
    _check_batch(x, "normalize")
    if not x.is_floating_point():
        raise ValueError(f"normalize needs a floating-point batch, got {x.dtype}")
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    if m.shape[1] != x.shape[1] or s.shape[1] != x.shape[1]:
        raise ValueError(
            f"normalize: {m.shape[1]} means and {s.shape[1]} stds for {x.shape[1]} channels"
        )
    return (x - m) / s
