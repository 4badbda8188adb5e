"""Qwen-Image-2.1 schedules against diffusers: the base checkpoint's dynamic shift (the pipeline's calculate_shift
and FlowMatchEulerDiscreteScheduler with the 2.1 scheduler config) and the Turbo checkpoint's sigma list."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oracles import QWEN_SCHEDULER
from qwen_image_core.qwen21 import schedule

SIZES = [(1024, 1024), (2048, 2048), (2400, 1792), (1536, 2752), (512, 768)]  # native 2K presets and smaller


def diffusers_sigmas(steps: int, height: int, width: int) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift, retrieve_timesteps

    sched = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    tokens = (2 * (height // 32)) * (2 * (width // 32))  # the pipeline's latents.shape[1]
    c = sched.config
    mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    retrieve_timesteps(sched, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched.sigmas


@pytest.mark.parametrize("height,width", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_base_schedule_matches_diffusers(height, width):
    for steps in (8, 40, 50):
        ours = schedule.sigmas(steps, schedule.target_tokens(height, width))
        ref = diffusers_sigmas(steps, height, width)
        assert ours.shape == ref.shape == (steps + 1,)
        assert (ours - ref).abs().max().item() <= 1e-6, (steps, height, width)


def test_mu_depends_on_the_size():
    """Not ComfyUI's fixed 0.69: 1024² gives 0.6935, 2048² 1.3129 (linear in the token count)."""
    assert schedule.mu(schedule.target_tokens(1024, 1024)) == pytest.approx(0.693548, abs=1e-6)
    assert schedule.mu(schedule.target_tokens(2048, 2048)) == pytest.approx(0.5 + 0.4 * (16384 - 256) / 7936)


def test_turbo_sigmas_exactly():
    """The Turbo list as published (ComfyUI's template ManualSigmas) and as diffusers loads it (shift 1, no
    dynamic shifting): bit for bit."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    published = [1.0, 0.978453, 0.95418, 0.926626, 0.89508, 0.845148, 0.704534, 0.414568, 0.0]
    ours = schedule.turbo_sigmas()
    assert ours.dtype == torch.float32
    assert torch.equal(ours, torch.tensor(published, dtype=torch.float32))
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=list(schedule.TURBO_SIGMAS), device="cpu")
    assert torch.equal(ours, sched.sigmas.float())
