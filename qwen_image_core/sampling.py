"""Flow-matching sampling for Qwen-Image: sigma schedules, the Euler sampler, and guidance.

k-diffusion conventions (Karras et al. 2022, arXiv 2206.00364), the protocol ComfyUI's KSAMPLER uses:
a sampler is `sample_x(model, x, sigmas, extra_args, callback, disable)` where `model(x, sigma, **extra_args)`
returns the denoised x0. The DiT predicts the flow velocity v = noise - x0 with x_t = sigma*noise +
(1 - sigma)*x0 (rectified flow, Esser et al. 2024, arXiv 2403.03206), so `FlowDenoiser` turns it into an
x0-denoiser: x0 = x - sigma*v; Euler on that denoiser is x + (sigma_next - sigma)*v.

Schedules are plain functions returning float32 sigmas ending in 0:
* `sigmas_diffusers`: the official schedule (diffusers' FlowMatchEulerDiscreteScheduler as the Qwen-Image
  pipelines configure it): linspace(1, 1/N, N), shifted by e^mu with mu linear in the image token count,
  stretched so that the last sigma is 0.02;
* `sigmas_comfy`: ComfyUI's ModelSamplingAuraFlow(shift) + "simple" scheduler (the official workflows);
* `sigmas_lightning`: the Lightning/Turbo LoRAs' plain shift 3 without terminal stretch, and
  `sigmas_from_list` for explicit lists.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .mmdit import patchify, unpatchify

# Qwen-Image's scheduler_config.json (diffusers)
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 8192
BASE_SHIFT, MAX_SHIFT = 0.5, 0.9
SHIFT_TERMINAL = 0.02
COMFY_TIMESTEPS = 1000  # entries of ComfyUI's ModelSamplingDiscreteFlow sigma table
LIGHTNING_SHIFT = 3.0

# ---------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------


def image_seq_len(height: int, width: int, patch: int = 2) -> int:
    """Image tokens of a latent of height x width latent pixels (ceil for odd sizes)."""
    return -(-height // patch) * -(-width // patch)


def mu_for(seq_len: int, base_len=BASE_SEQ_LEN, max_len=MAX_SEQ_LEN, base_shift=BASE_SHIFT, max_shift=MAX_SHIFT):
    """Resolution-dependent shift exponent: linear from base_shift at base_len to max_shift at max_len (no clamp)."""
    return base_shift + (max_shift - base_shift) * (seq_len - base_len) / (max_len - base_len)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Static time shift s' = shift*s / (1 + (shift - 1)*s) (SD3's shift; e^mu for the dynamic one)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def stretch_to_terminal(sigmas: torch.Tensor, terminal: float) -> torch.Tensor:
    """Rescale 1 - sigma so that the last sigma becomes `terminal` (diffusers' shift_terminal).

    A schedule whose last sigma is 1 (one step: linspace(1, 1/1, 1)) has nothing to rescale: diffusers divides by
    zero there and samples NaN; it is returned as it is, so one step goes from 1 straight to 0."""
    one_minus = 1 - sigmas
    if float(one_minus[-1]) == 0.0:
        return sigmas
    return 1 - one_minus * ((1 - terminal) / one_minus[-1])


def _finish(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def sigmas_diffusers(steps: int, seq_len: int, terminal: float | None = SHIFT_TERMINAL, mu: float | None = None):
    """The official schedule [steps + 1]: linspace(1, 1/N, N), shift e^mu (mu from `seq_len`), terminal stretch, 0."""
    base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    sigmas = shift_sigmas(base, math.exp(mu_for(seq_len) if mu is None else mu))
    if terminal:
        sigmas = stretch_to_terminal(sigmas, terminal)
    return _finish(sigmas)


def sigmas_comfy(steps: int, shift: float = 3.1, multiplier: float = 1.0) -> torch.Tensor:
    """ComfyUI's ModelSamplingAuraFlow(shift) sigma table read by the "simple" scheduler, then 0 [steps + 1]."""
    table = shift_sigmas(
        torch.arange(1, COMFY_TIMESTEPS + 1, dtype=torch.float32) / COMFY_TIMESTEPS * multiplier, shift
    )
    stride = COMFY_TIMESTEPS / steps
    return _finish(torch.stack([table[-(1 + int(i * stride))] for i in range(steps)]))


def sigmas_lightning(steps: int, shift: float = LIGHTNING_SHIFT) -> torch.Tensor:
    """Lightning/Turbo schedule: linspace(1, 1/N, N) with a plain shift of 3, no terminal stretch, then 0."""
    return _finish(shift_sigmas(torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64), shift))


def sigmas_from_list(values: Sequence[float]) -> torch.Tensor:
    """An explicit schedule (e.g. a distilled model's published sigmas); a final 0 is appended if missing."""
    s = torch.tensor(list(values), dtype=torch.float32)
    return s if s[-1] == 0 else _finish(s)


# ---------------------------------------------------------------------------------------------------------
# Partial denoising (img2img)
# ---------------------------------------------------------------------------------------------------------


def sigmas_for_denoise(schedule: Callable[[int], torch.Tensor], steps: int, denoise: float) -> torch.Tensor:
    """ComfyUI's denoise < 1: build the schedule for int(steps / denoise) steps and keep its last steps + 1 sigmas."""
    if denoise > 0.9999:  # ComfyUI's threshold
        return schedule(steps)
    if denoise <= 0.0:
        return torch.zeros(0)
    return schedule(int(steps / denoise))[-(steps + 1) :]


def sigmas_for_strength(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """diffusers' img2img strength: skip the first int(N - N*strength) of the N steps of a full schedule."""
    n = len(sigmas) - 1
    return sigmas[int(max(n - min(n * strength, n), 0)) :]


def noise_latent(latent: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The flow-matching forward process at `sigma`: sigma*noise + (1 - sigma)*latent (start of img2img)."""
    return sigma * noise + (1 - sigma) * latent


# ---------------------------------------------------------------------------------------------------------
# Denoisers
# ---------------------------------------------------------------------------------------------------------


def _per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])


def _bcast(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class FlowDenoiser:
    """Wraps a velocity model `model(x, sigma, *args, **kw) -> v` as a k-diffusion x0-denoiser: x0 = x - sigma*v."""

    def __init__(self, model: Callable):
        self.model = model

    def __call__(self, x: torch.Tensor, sigma, *args, **kwargs) -> torch.Tensor:
        s = _per_sample(sigma, x)
        return x - _bcast(s, x) * self.model(x, s, *args, **kwargs)


def token_norm_rescale(comb: torch.Tensor, cond: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """diffusers' CFG rescale: scale each token's guided velocity to the norm of its conditional one.

    Norms are over one token's features (16 channels x patch x patch), as on diffusers' packed latents.
    """
    tc, grid = patchify(comb, patch)
    tcond, _ = patchify(cond, patch)
    out = tc * (tcond.norm(dim=-1, keepdim=True) / tc.norm(dim=-1, keepdim=True))
    return unpatchify(out, grid, patch, comb.shape[-2:])


def cfg_norm(x0_cfg: torch.Tensor, x0_cond: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """ComfyUI's CFGNorm: x0 scaled per pixel by min(1, |x0_cond| / |x0_cfg|) over the channels, times strength."""
    scale = (x0_cond.norm(dim=1, keepdim=True) / (x0_cfg.norm(dim=1, keepdim=True) + 1e-8)).clamp(0.0, 1.0)
    return x0_cfg * scale * strength


def join_texts(texts: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None]):
    """Concatenate text embeddings [B_i, L_i, D] along the batch, right-padded with zeros, and their key mask."""
    length = max(t.shape[1] for t in texts)
    padded, full_masks = [], []
    for t, m in zip(texts, masks, strict=True):
        b, n = t.shape[:2]
        m = torch.ones(b, n, dtype=torch.bool, device=t.device) if m is None else m.to(torch.bool)
        padded.append(torch.nn.functional.pad(t, (0, 0, 0, length - n)))
        full_masks.append(torch.nn.functional.pad(m, (0, length - n), value=False))
    return torch.cat(padded), torch.cat(full_masks)


class CFGDenoiser:
    """True classifier-free guidance with cond and uncond in one batched forward (text padded + key mask).

    rescale="norm": diffusers' Qwen pipelines, on velocity: v = v_u + s*(v_c - v_u), then each token rescaled to
    |v_c| (no clamp). rescale="cfgnorm": ComfyUI's CFGNorm, on x0 per pixel, clamped at 1, times `strength`.
    rescale=None: plain CFG. scale 1 or no uncond runs the cond pass alone.
    """

    def __init__(self, model: Callable, scale: float = 4.0, rescale: str | None = "norm", strength: float = 1.0):
        if rescale not in ("norm", "cfgnorm", None):
            raise ValueError(f"rescale must be 'norm', 'cfgnorm' or None, not {rescale!r}")
        self.model, self.scale, self.rescale, self.strength = model, scale, rescale, strength

    def __call__(self, x, sigma, cond, uncond=None, cond_mask=None, uncond_mask=None, ref_latents=None, **kwargs):
        s = _per_sample(sigma, x)
        sb = _bcast(s, x)
        if uncond is None or self.scale == 1.0:
            return x - sb * self.model(x, s, cond, cond_mask, ref_latents=ref_latents, **kwargs)
        txt, mask = join_texts([cond, uncond], [cond_mask, uncond_mask])
        b = x.shape[0]
        refs = [r if r.shape[0] == 1 else torch.cat([r, r]) for r in ref_latents or []] or None
        if cond_mask is None and uncond_mask is None:  # unpadded prompts: their lengths say it all (host ints)
            kwargs["txt_lengths"] = [cond.shape[1]] * b + [uncond.shape[1]] * b
            mask = None
        v_c, v_u = self.model(torch.cat([x, x]), torch.cat([s, s]), txt, mask, ref_latents=refs, **kwargs).split(b)
        if self.rescale == "norm":
            return x - sb * token_norm_rescale(v_u + self.scale * (v_c - v_u), v_c)
        x0_c, x0_u = x - sb * v_c, x - sb * v_u
        x0 = x0_u + self.scale * (x0_c - x0_u)
        return cfg_norm(x0, x0_c, self.strength) if self.rescale == "cfgnorm" else x0


# ---------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------


def _steps(n: int, disable):
    try:
        from tqdm.auto import trange  # noqa: PLC0415
    except ImportError:
        return range(n)
    return trange(n, disable=disable)


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler's method on the x0-denoiser (Karras et al. 2022, Algorithm 2 without churn).

    callback receives {"x", "i", "sigma", "sigma_hat", "denoised"} after each model call.
    """
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in _steps(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        d = (x - denoised) / sigma  # the velocity for a flow denoiser
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + d * (sigma_next - sigma)
    return x
