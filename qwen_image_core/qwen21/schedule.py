"""Sigma schedules of Qwen-Image-2.1: the dynamic shift from the token count, and the Turbo checkpoint's list.

The base checkpoint samples as diffusers' `QwenImage21Pipeline` configures FlowMatchEulerDiscreteScheduler
(scheduler_config.json of Qwen/Qwen-Image-2.1, the same numbers as v1's): linspace(1, 1/N, N), shifted by
e^mu where mu is linear in the target's token count (one token per 16 x 16 pixels, so 1024² is 4096 tokens,
mu 0.69, and 2048² is 16384 tokens, mu 1.31; ComfyUI uses 0.69 at every size, ComfyUI issue #16447), then
stretched so the last sigma is 0.02, then 0. The arithmetic is `sampling`'s (shared with v1); only the
token count differs (patch 1 on the 16x VAE).

The Turbo checkpoint ships its sigmas (`sample_sigmas` in Qwen/Qwen-Image-2.1-Turbo's model_index.json; its
scheduler has shift 1 and no dynamic shifting), used as they are at every size, then 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import sampling

VAE_SCALE = 16  # image pixels per latent pixel (and per DiT token: patch size 1)
TURBO_SIGMAS = (1.0, 0.978453, 0.95418, 0.926626, 0.89508, 0.845148, 0.704534, 0.414568)  # 8 steps, then 0
DEFAULT_STEPS, TURBO_STEPS = 40, 8  # the pipelines' defaults


@dataclass(frozen=True)
class ScheduleConfig:
    """Qwen/Qwen-Image-2.1's scheduler_config.json (FlowMatchEulerDiscreteScheduler, dynamic exponential shift)."""

    base_shift: float = 0.5  # mu at base_seq_len tokens
    max_shift: float = 0.9  # mu at max_seq_len tokens (extrapolated beyond, not clamped)
    base_seq_len: int = 256  # tokens (256² pixels)
    max_seq_len: int = 8192  # tokens
    shift_terminal: float | None = 0.02  # the last sigma before 0


BASE = ScheduleConfig()


def target_tokens(height: int, width: int) -> int:
    """DiT tokens of a height x width pixel target, as the pipeline rounds it (even latent sides)."""
    return (2 * (height // (2 * VAE_SCALE))) * (2 * (width // (2 * VAE_SCALE)))


def mu(tokens: int, cfg: ScheduleConfig = BASE) -> float:
    """The shift exponent for a target of `tokens` tokens."""
    return sampling.mu_for(tokens, cfg.base_seq_len, cfg.max_seq_len, cfg.base_shift, cfg.max_shift)


def shifted(base: Sequence[float] | torch.Tensor, tokens: int, cfg: ScheduleConfig = BASE) -> torch.Tensor:
    """Explicit base sigmas (no final 0) through the base checkpoint's shift and terminal stretch, then 0: what
    the pipeline does to the `sigmas` a caller passes."""
    s = torch.as_tensor(base, dtype=torch.float64)
    s = sampling.shift_sigmas(s, math.exp(mu(tokens, cfg)))
    if cfg.shift_terminal:
        s = sampling.stretch_to_terminal(s, cfg.shift_terminal)
    return torch.cat([s, s.new_zeros(1)]).to(torch.float32)


def sigmas(steps: int, tokens: int, cfg: ScheduleConfig = BASE) -> torch.Tensor:
    """The base checkpoint's schedule [steps + 1] for a target of `tokens` tokens (see `target_tokens`)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    return shifted(torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64), tokens, cfg)


def turbo_sigmas() -> torch.Tensor:
    """The Turbo checkpoint's 8-step schedule [9], exactly as published, ending in 0."""
    return sampling.sigmas_from_list(TURBO_SIGMAS)
