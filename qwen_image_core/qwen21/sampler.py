"""Sampling the Qwen-Image-2.1 DiT: a run's prefix caches computed once, then the shared samplers.

`Velocity21` is the DiT as a plain velocity model `v(x, sigma)` for one run: at its first call it computes
the prefix K/V cache of the condition (and of the negative one with CFG), and every call after runs the
target's tokens only. True CFG is the reference's: v = v_neg + scale (v_pos - v_neg), two passes (the two
conditions have their own prefixes), no rescale. `sample` runs it through `sampling.FlowDenoiser` and a
k-diffusion sampler (Euler by default, as the reference), on a schedule from `schedule.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import sampling
from .attention import PrefixCache
from .dit import DiT21


@dataclass
class Condition21:
    """What the DiT is conditioned on: the condition encoder's hidden states [B, L, text_dim], the references'
    image slots [L] and their latents [1 or B, 64, h, w] in prompt order, the text mask [B, L] or None."""

    txt: torch.Tensor
    image_slots: torch.Tensor | None = None
    ref_latents: list[torch.Tensor] | None = None
    txt_mask: torch.Tensor | None = None

    def args(self) -> tuple:
        return self.txt, self.image_slots, self.ref_latents, self.txt_mask


class Velocity21:
    """`v(x, sigma)` of one run: prefix caches filled at the first call (use_cache=False: the whole sequence
    every step, for comparison; cache_device: where they are kept, see `PrefixCache`); `negative` with
    cfg_scale != 1 adds the guided pass."""

    def __init__(self, model: DiT21, cond: Condition21, negative: Condition21 | None = None, cfg_scale: float = 1.0,
                 use_cache: bool = True, attention_fn: Callable | None = None, cache_device=None):  # fmt: skip
        if negative is None and cfg_scale != 1.0:
            raise ValueError(f"cfg_scale {cfg_scale} needs a negative condition")
        self.model, self.cond, self.cfg_scale, self.use_cache = model, cond, cfg_scale, use_cache
        self.negative = negative if cfg_scale != 1.0 else None
        self.attention_fn, self.cache_device = attention_fn, cache_device
        self.caches: dict[str, PrefixCache] = {}

    def _one(self, name: str, c: Condition21, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not self.use_cache:
            return self.model(x, sigma, *c.args(), attention_fn=self.attention_fn)
        if name not in self.caches:
            self.caches[name] = self.model.prefill(
                *c.args(), dtype=x.dtype, attention_fn=self.attention_fn, cache_device=self.cache_device
            )
        return self.model(x, sigma, cache=self.caches[name], attention_fn=self.attention_fn)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v = self._one("cond", self.cond, x, sigma)
        if self.negative is None:
            return v
        v_neg = self._one("negative", self.negative, x, sigma)
        return v_neg + self.cfg_scale * (v - v_neg)


@torch.no_grad()
def sample(model: DiT21, x: torch.Tensor, sigmas: torch.Tensor, cond: Condition21,
           negative: Condition21 | None = None, cfg_scale: float = 1.0, use_cache: bool = True,
           sampler: Callable = sampling.sample_euler, callback: Callable | None = None) -> torch.Tensor:  # fmt: skip
    """The denoised latent [B, 64, H, W] from x [B, 64, H, W], the latent at sigmas[0] (pure noise at 1), along
    `sigmas` (ending in 0)."""
    velocity = Velocity21(model, cond, negative, cfg_scale, use_cache)
    return sampler(sampling.FlowDenoiser(velocity), x, sigmas.to(x.device), callback=callback, disable=True)
