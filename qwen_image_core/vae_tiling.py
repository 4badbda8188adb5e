"""Tiled VAE encode/decode: split the latent grid into overlapping tiles, run each alone, blend linearly.

Every output pixel is a convex combination of the tiles that cover it: weights are products of
per-axis linear ramps across each overlap, normalised to sum to 1. Where a single tile covers a pixel
the result is exactly that tile's. Tiles are laid out in latent units, so encoder tiles start on
multiples of 8 pixels and their latents line up.

Tiling is chosen automatically from a working-memory estimate: bytes per image pixel, measured with
`bench/bench_vae.py --calibrate` (peak RSS minus the loaded model, untiled, float32, on CPU), scaled by
the dtype's size and the model width.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import progress

# working memory per image pixel, per byte of the compute dtype, at base_dim 96. Measured with
# `bench_vae.py --calibrate` (CPU, float32, 256²/512²/768²): encode 283 B/px slope (292 at 768²), decode
# 355 B/px slope + 0.11 GiB fixed (398 at 768²); rounded up for a margin.
BYTES_PER_PIXEL = {"encode": 300.0, "decode": 420.0}
MIN_TILE = 128  # pixels; smaller tiles give visible seams, as the tile no longer sees enough context
TILE_STEP = 64  # auto tile sizes are multiples of this (pixels)


@dataclass(frozen=True)
class Tiling:
    """Tiles of `size` x `size` image pixels sharing `overlap` pixels with each neighbour (multiples of 8)."""

    size: int = 512
    overlap: int = 128

    def __post_init__(self):
        if self.size % 8 or self.overlap % 8 or self.size <= 0 or self.overlap < 0:
            raise ValueError(f"tile size and overlap must be non-negative multiples of 8 pixels, got {self}")
        if self.overlap * 2 > self.size:
            raise ValueError(f"overlap must be at most half the tile size, got {self}")


def estimate_bytes(kind: str, cfg, batch: int, pixels: int, dtype: torch.dtype) -> int:
    """Working memory of an untiled encode or decode producing/consuming `pixels` image pixels per item."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return int(BYTES_PER_PIXEL[kind] * itemsize * cfg.base_dim / 96 * batch * pixels)


def default_budget(device: torch.device) -> int:
    """Bytes the VAE may use: 80% of free CUDA memory, or half of the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 4 if hasattr(os, "sysconf") else 4 << 30


def choose_tiling(tile, kind: str, x: torch.Tensor, cfg, budget: int | None) -> Tiling | None:
    """The Tiling to use for `x` (images for encode, raw latents for decode), or None for one pass."""
    if tile is False:
        return None
    if isinstance(tile, Tiling):
        return tile
    if tile not in (None, "auto"):
        raise ValueError(f"tile must be None, 'auto', False or a Tiling, got {tile!r}")
    s = 1 if kind == "encode" else cfg.scale
    height, width = x.shape[-2] * s, x.shape[-1] * s  # image pixels
    budget = default_budget(x.device) if budget is None else budget
    if estimate_bytes(kind, cfg, x.shape[0], height * width, x.dtype) <= budget:
        return None
    size = MIN_TILE
    while (
        size + TILE_STEP < max(height, width)
        and estimate_bytes(kind, cfg, x.shape[0], (size + TILE_STEP) ** 2, x.dtype) <= budget
    ):
        size += TILE_STEP
    return Tiling(size, size // 4 // 16 * 16)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` covering `length`, spread evenly with overlaps >= `overlap`."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _ramps(starts: list[int], tile: int, length: int, scale: int) -> list[torch.Tensor]:
    """Per-tile 1D blend weights (output units): linear ramps across the overlaps with both neighbours."""
    out = []
    for k, a in enumerate(starts):
        n = min(tile, length) * scale
        w = torch.ones(n)
        if k > 0:  # rising over the overlap with the previous tile
            left = (starts[k - 1] + tile - a) * scale
            w[:left] *= torch.arange(1, left + 1) / (left + 1)
        if k < len(starts) - 1:  # falling over the overlap with the next tile
            right = (a + tile - starts[k + 1]) * scale
            w[n - right :] *= torch.arange(right, 0, -1) / (right + 1)
        out.append(w)
    return out


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int, overlap: int,
              x_per_latent: int, out_per_latent: int,
              check: Callable[[], None] | None = None) -> torch.Tensor:  # fmt: skip
    """fn applied to overlapping tiles of x and blended; tile `size` and `overlap` are in latent units.

    x is in pixels (x_per_latent 8, encode) or latents (1, decode); fn's output has out_per_latent
    values per latent along each axis. check: called before each tile; raise from it to stop.
    """
    lat_h, lat_w = x.shape[-2] // x_per_latent, x.shape[-1] // x_per_latent
    rows, cols = tile_starts(lat_h, size, overlap), tile_starts(lat_w, size, overlap)
    ramp_h, ramp_w = _ramps(rows, size, lat_h, out_per_latent), _ramps(cols, size, lat_w, out_per_latent)
    th, tw = min(size, lat_h), min(size, lat_w)
    out = weight = None
    done, total = 0, len(rows) * len(cols)
    for r, wr in zip(rows, ramp_h, strict=True):
        for c, wc in zip(cols, ramp_w, strict=True):
            if check is not None:
                check()
            piece = x[..., r * x_per_latent : (r + th) * x_per_latent, c * x_per_latent : (c + tw) * x_per_latent]
            y = fn(piece).float()  # [B, C, th * out_per_latent, tw * out_per_latent]
            if out is None:
                out = torch.zeros(*y.shape[:2], lat_h * out_per_latent, lat_w * out_per_latent, device=y.device)
                weight = torch.zeros(lat_h * out_per_latent, lat_w * out_per_latent, device=y.device)
            mask = (wr[:, None] * wc[None, :]).to(y.device)  # [th * out_per_latent, tw * out_per_latent]
            ys, xs = (
                slice(r * out_per_latent, (r + th) * out_per_latent),
                slice(c * out_per_latent, (c + tw) * out_per_latent),
            )
            out[..., ys, xs].add_(y.mul_(mask))
            weight[ys, xs].add_(mask)
            del y
            done += 1
            progress.step(check, done, total)  # a host's progress bar, per tile
    return out.div_(weight).to(x.dtype)
