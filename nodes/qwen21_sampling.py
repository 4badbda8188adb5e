"""Qwen-Image-2.1 schedule nodes for ComfyUI's samplers: the MODEL's dynamic shift for a latent, and the
reference's exact sigmas as SIGMAS (for SamplerCustomAdvanced), both from `qwen_image_core.qwen21.schedule`.

ComfyUI's schedulers read the shift from the MODEL's model sampling, which cannot see the latent; the 2.1
shift depends on the target's token count, so `Qwen-Image-2.1 Model Sampling` sets it for a latent (as
ModelSamplingFlux does from a width and height). With it, KSampler's `simple` schedule is the reference's
shifted linspace before the terminal stretch (the reference rescales 1 - sigma so the last sigma is 0.02,
which needs the step count and moves every sigma: by up to 0.03 at 1024², 0.07 at 2048² with 40 steps);
`Qwen-Image-2.1 Sigmas` is the reference's schedule exactly, the Turbo list included.
"""

from __future__ import annotations

import torch

from ..qwen_image_core.qwen21.pipeline import make_sigmas
from ..qwen_image_core.qwen21.schedule import VAE_SCALE, target_tokens
from . import host
from .qwen21_loaders import CATEGORY
from .qwen21_model import LatentFormat21, ModelSampling21, with_tokens

SCHEDULES = ("dynamic", "turbo")  # the base checkpoint's shift from the token count; the Turbo file's 8 sigmas


def _latent_grid(latent) -> tuple[int, int]:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    channels = LatentFormat21.latent_channels
    if not isinstance(samples, torch.Tensor) or samples.dim() != 4 or samples.shape[1] != channels:
        shape = list(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise host.InputError(
            f"latent: {shape} is not a Qwen-Image-2.1 latent [B, {channels}, h, w]\n"
            "Fix: connect the latent output of Qwen-Image-2.1 Encode"
        )
    return samples.shape[-2], samples.shape[-1]


class QwenPix21ModelSampling:
    DISPLAY_NAME = "Qwen-Image-2.1 Model Sampling"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The MODEL with the 2.1 dynamic shift for this latent's token count.",)
    FUNCTION = "patch"
    DESCRIPTION = (
        "Sets the Qwen-Image-2.1 MODEL's flow shift to the model's dynamic shift (e^mu, mu linear in the token "
        "count) for the connected latent's size, as the reference pipeline does. KSampler's 'simple' schedule "
        "is then the reference's before its terminal stretch (which rescales every sigma so the last is 0.02: "
        "up to 0.03 apart at 1024², 40 steps); use Qwen-Image-2.1 Sigmas with SamplerCustomAdvanced for the exact "
        "schedule."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL output of Load Qwen-Image-2.1 Diffusion Model."}),
                "latent": ("LATENT", {"tooltip": "The latent to be sampled (its size sets the shift)."}),
            }
        }

    def patch(self, model, latent):
        if not isinstance(model.get_model_object("model_sampling"), ModelSampling21):
            raise host.InputError(
                "model: not a Qwen-Image-2.1 MODEL (or its model sampling was replaced, e.g. by "
                "ModelSamplingAuraFlow)\nFix: connect the MODEL output of Load Qwen-Image-2.1 Diffusion Model"
            )
        h, w = _latent_grid(latent)
        return (with_tokens(model, target_tokens(h * VAE_SCALE, w * VAE_SCALE)),)


class QwenPix21Sigmas:
    DISPLAY_NAME = "Qwen-Image-2.1 Sigmas"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("The reference's sigmas for this latent (ending in 0), for SamplerCustomAdvanced.",)
    FUNCTION = "sigmas"
    DESCRIPTION = (
        "The Qwen-Image-2.1 reference schedule exactly: 'dynamic' (the base checkpoint: linspace shifted by the "
        "dynamic shift of the latent's token count, the last sigma stretched to 0.02) or 'turbo' (the Turbo "
        "checkpoint's published 8 sigmas). Connect to SamplerCustomAdvanced's sigmas."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "latent": ("LATENT", {"tooltip": "The latent to be sampled (its size sets the shift)."}),
                "steps": ("INT", {"default": 40, "min": 1, "max": 1000, "tooltip": "Euler steps (turbo: 8)."}),
                "schedule": (
                    list(SCHEDULES),
                    {"default": "dynamic", "tooltip": "dynamic: the base checkpoint. turbo: the Turbo file's 8."},
                ),
            }
        }

    def sigmas(self, latent, steps, schedule):
        h, w = _latent_grid(latent)
        try:
            return (make_sigmas(schedule, int(steps), h * VAE_SCALE, w * VAE_SCALE),)
        except ValueError as e:
            raise host.InputError(f"schedule: {e}\nFix: with 'turbo' set steps to 8") from None


NODES = {"QwenPix21ModelSampling": QwenPix21ModelSampling, "QwenPix21Sigmas": QwenPix21Sigmas}
