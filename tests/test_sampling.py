"""Schedules against diffusers' FlowMatchEulerDiscreteScheduler and ComfyUI's ModelSamplingAuraFlow + simple;
a 4-step CFG sampling loop against the same loop run with diffusers' scheduler and model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oracles import QWEN_SCHEDULER, diffusers_dit
from qwen_image_core import sampling as S
from qwen_image_core.mmdit import load_dit, patchify, unpatchify
from tools.checkpoints import dit as W


def diffusers_sigmas(steps, seq_len, **overrides):
    from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: PLC0415
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift  # noqa: PLC0415

    sched = FlowMatchEulerDiscreteScheduler(**{**QWEN_SCHEDULER, **overrides})
    c = sched.config
    mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched


def comfy_sigmas(steps, shift, denoise=None):
    from tools.comfy_paths import import_comfy_for_oracle  # noqa: PLC0415

    import_comfy_for_oracle()
    import comfy.model_sampling as ms  # noqa: PLC0415
    import comfy.samplers  # noqa: PLC0415

    class AuraFlow(ms.ModelSamplingDiscreteFlow, ms.CONST):  # what the ModelSamplingAuraFlow node builds
        pass

    m = AuraFlow()
    m.set_parameters(shift=shift, multiplier=1.0)
    if denoise is None:
        return comfy.samplers.simple_scheduler(m, steps)
    return comfy.samplers.simple_scheduler(m, int(steps / denoise))[-(steps + 1) :]  # KSampler.set_steps


@pytest.mark.parametrize("steps", [4, 8, 20, 50])
@pytest.mark.parametrize("size", [(1024, 1024), (1328, 1328), (1664, 928), (512, 768), (256, 256)])
def test_official_schedule_equals_diffusers(steps, size):
    seq_len = S.image_seq_len(size[0] // 8, size[1] // 8)
    ref = diffusers_sigmas(steps, seq_len).sigmas
    ours = S.sigmas_diffusers(steps, seq_len)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    assert (ours - ref).abs().max() <= 1e-6


def test_official_schedule_known_values():
    assert S.mu_for(4096) == pytest.approx(0.693548, abs=1e-6)
    assert S.sigmas_diffusers(8, 6889)[:4].tolist() == pytest.approx([1.0, 0.923934, 0.835336, 0.730829], abs=1e-6)


def test_one_step_schedule_goes_from_one_to_zero():
    """One step: the terminal stretch has nothing to rescale (diffusers divides by zero and samples NaN)."""
    ref = diffusers_sigmas(1, 4096).sigmas
    assert bool(ref[:-1].isnan().all())  # the reference's own one-step schedule
    for seq_len in (256, 4096, 6889):
        assert S.sigmas_diffusers(1, seq_len).tolist() == [1.0, 0.0]
    assert S.sigmas_diffusers(2, 4096).tolist() == pytest.approx([1.0, 0.02, 0.0], abs=1e-7)


@pytest.mark.parametrize("steps", [1, 4, 7, 8, 20, 50])
@pytest.mark.parametrize("shift", [3.0, 3.1, 3.5, 1.15])
def test_comfy_schedule_equals_aura_flow_simple(steps, shift):
    assert (S.sigmas_comfy(steps, shift) - comfy_sigmas(steps, shift)).abs().max() <= 1e-6


@pytest.mark.parametrize("steps", [4, 8])
def test_lightning_schedule(steps):
    ref = diffusers_sigmas(steps, 4096, base_shift=math.log(3), max_shift=math.log(3), shift_terminal=None).sigmas
    assert (S.sigmas_lightning(steps) - ref).abs().max() <= 1e-6
    assert (S.sigmas_lightning(steps) - comfy_sigmas(steps, 3.0)).abs().max() <= 1e-6  # 1000 / steps integral
    assert S.sigmas_from_list([1.0, 0.5, 0.25]).tolist() == [1.0, 0.5, 0.25, 0.0]


@pytest.mark.parametrize("denoise", [0.3, 0.6, 0.75, 1.0])
def test_denoise_below_one(denoise):
    ours = S.sigmas_for_denoise(lambda n: S.sigmas_comfy(n, 3.1), 10, denoise)
    assert (ours - comfy_sigmas(10, 3.1, None if denoise == 1.0 else denoise)).abs().max() <= 1e-6
    sched = diffusers_sigmas(10, 1024)  # diffusers' img2img: QwenImageImg2ImgPipeline.get_timesteps
    t_start = int(max(10 - min(10 * denoise, 10), 0))
    assert (S.sigmas_for_strength(S.sigmas_diffusers(10, 1024), denoise) - sched.sigmas[t_start:]).abs().max() <= 1e-6
    z, n = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    sched = diffusers_sigmas(10, 1024)
    ref = sched.scale_noise(z, sched.timesteps[3:4], n)
    assert torch.allclose(S.noise_latent(z, n, sched.sigmas[3]), ref, atol=1e-6)


def test_cfgnorm_equals_comfy_node():
    from tools.comfy_paths import import_comfy_for_oracle  # noqa: PLC0415

    import_comfy_for_oracle()
    from comfy_extras.nodes_cfg import CFGNorm  # noqa: PLC0415

    captured = {}

    class FakeModel:
        def clone(self):
            return self

        def set_model_sampler_post_cfg_function(self, fn):
            captured["fn"] = fn

    CFGNorm.execute(FakeModel(), 0.8)
    g = torch.Generator().manual_seed(0)
    x0_cond, x0_cfg = torch.randn(2, 16, 6, 6, generator=g), 3 * torch.randn(2, 16, 6, 6, generator=g)
    ref = captured["fn"]({"cond_denoised": x0_cond, "denoised": x0_cfg})
    assert torch.allclose(S.cfg_norm(x0_cfg, x0_cond, 0.8), ref, atol=1e-7)


def test_four_step_cfg_loop_equals_diffusers(tmp_path):
    """Ours: one batched cond+uncond forward per step through CFGDenoiser + sample_euler. Reference: the
    QwenImagePipeline loop (two forwards, norm-preserving rescale, scheduler.step) with diffusers' model."""

    cfg = W.tiny_config()
    model = load_dit(W.write_comfy(tmp_path / "tiny.safetensors", cfg, dtype=torch.float32))
    ref_model = diffusers_dit(cfg, W.state_dict(cfg))
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(1, 16, 12, 8, generator=g)
    cond, uncond = torch.randn(1, 9, 40, generator=g), torch.randn(1, 4, 40, generator=g)
    steps, scale, seq_len = 4, 4.0, S.image_seq_len(12, 8)

    sched = diffusers_sigmas(steps, seq_len)
    latents, grid = patchify(noise, 2)
    shapes = [[(1, *grid)]]
    with torch.no_grad():
        for t in sched.timesteps:
            ts = t.expand(1) / 1000
            v_c = ref_model(latents, cond, timestep=ts, img_shapes=shapes, return_dict=False)[0]
            v_u = ref_model(latents, uncond, timestep=ts, img_shapes=shapes, return_dict=False)[0]
            comb = v_u + scale * (v_c - v_u)
            v = comb * (v_c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
            latents = sched.step(v, t, latents, return_dict=False)[0]
    expected = unpatchify(latents, grid, 2, noise.shape[-2:])

    seen = []
    ours = S.sample_euler(
        S.CFGDenoiser(model, scale),
        noise,
        S.sigmas_diffusers(steps, seq_len),
        extra_args={"cond": cond, "uncond": uncond},
        callback=lambda d: seen.append(d["i"]),
        disable=True,
    )
    assert seen == [0, 1, 2, 3]
    err, peak = (ours - expected).abs().max().item(), expected.abs().max().item()
    assert err <= 1e-5 * peak, f"{err} vs scale {peak}"


def test_flow_denoiser_euler_is_velocity_step():
    """Euler on x0 = x - sigma*v equals x + (sigma_next - sigma)*v, with the model seeing sigma per sample."""
    calls = []

    def velocity(x, sigma, **kw):
        calls.append(sigma.clone())
        return 0.5 * x + 1.0

    x = torch.randn(2, 16, 4, 4)
    sigmas = torch.tensor([1.0, 0.6, 0.0])
    out = S.sample_euler(S.FlowDenoiser(velocity), x.clone(), sigmas, disable=True)
    ref = x.clone()
    for s, sn in zip(sigmas[:-1], sigmas[1:], strict=True):
        ref = ref + (sn - s) * (0.5 * ref + 1.0)
    assert torch.allclose(out, ref, atol=1e-6)
    assert calls[0].tolist() == [1.0, 1.0] and calls[1].tolist() == pytest.approx([0.6, 0.6])
