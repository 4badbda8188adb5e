"""Qwen-Image Sampler (several devices): one image's tokens split over N devices (Ulysses sequence parallel).

The work is the core's (`qwen_image_core.parallel`): N worker processes, one per device, each load the MODEL's
DiT file once and stay up between prompts (they are held by the loaded model and end with it or with the
server); this node sends them the conditioning and noise and receives the latents. ComfyUI's cancel button
stops every worker at the same step; a worker's error or death is this node's error, the server stays up.
"""

from __future__ import annotations

import os

import comfy.sample
import comfy.utils
import torch

from ..qwen_image_core.parallel import jobs
from ..qwen_image_core.parallel.group import check_devices
from ..qwen_image_core.parallel.workers import DitFile, Workers
from ..qwen_image_core.pipeline import Conditioning, make_sigmas
from . import checks, host, notices
from .loaders import DIT

CATEGORY = "QwenPix/sampling"
USED_COND_KEYS = {"attention_mask", "reference_latents", "pooled_output"}  # pooled_output: Qwen has none


def _conditioning(name: str, conditioning, text_dim: int) -> Conditioning:
    """The core Conditioning of a one-entry CONDITIONING (text, mask, reference latents); the rest named."""
    checks.check_conditioning(name, conditioning, text_dim)
    if len(conditioning) != 1:
        raise host.InputError(
            f"{name}: {len(conditioning)} conditioning entries; the several-device sampler takes one\n"
            "Fix: connect one Text Encode / Edit Encode output, or use the Qwen-Image Sampler"
        )
    embeds, extra = conditioning[0]
    for key in sorted(set(extra) - USED_COND_KEYS):
        notices.warn(f"{name}: conditioning key '{key}' is not used by the several-device sampler; it has no effect")
    mask = extra.get("attention_mask")
    if mask is not None:
        mask = mask.reshape(embeds.shape[:2]).bool()
        mask = None if bool(mask.all()) else mask
    refs = [host.latent_to_core(r) for r in extra.get("reference_latents") or []]
    return Conditioning(embeds.float().cpu(), mask, refs or None)


def _devices(text: str) -> tuple[str, ...]:
    devices = tuple(d.strip() for d in str(text).split(",") if d.strip())
    try:
        check_devices(devices)
        for d in devices:
            torch.device(d)
    except (ValueError, RuntimeError) as e:
        raise host.InputError(f"devices '{text}': {e}\nFix: list one device per rank, e.g. cuda:0,cuda:1") from None
    return devices


def _workers(core, devices: tuple[str, ...], budget: int | None) -> Workers:
    """The workers of this DiT on these devices, started on first use and kept on the model between prompts."""
    gpus = all(torch.device(d).type == "cuda" for d in devices)  # mapped: each worker copies it to its GPU
    dit = DitFile(str(core.path), (("zero_cond_t", core.zero_cond_t), ("mmap", gpus)), budget)
    held = getattr(core, "parallel_workers", None)
    if held is not None and held.devices == devices and held.dit == dit:
        return held
    if held is not None:
        held.stop()
    threads = 0 if gpus else max(1, (os.cpu_count() or 1) // len(devices))  # CPU ranks share the cores
    core.parallel_workers = Workers(dit, devices, threads=threads)
    return core.parallel_workers


def _check_model(dit, core) -> None:
    if not getattr(core, "path", None):
        raise host.InputError(
            "dit: this MODEL has no QwenPix DiT file to give the workers\n"
            "Fix: load it with Load Qwen-Image Diffusion Model"
        )
    if dit.patches:
        raise host.InputError(
            "dit: LoRAs / weight patches are not applied by the several-device sampler (its workers load the file)\n"
            "Fix: use the Qwen-Image Sampler for LoRA'd models"
        )
    if dit.object_patches.get("diffusion_model.positions", "official") != "official":
        raise host.InputError(
            "dit: loaded with positions 'ComfyUI native'; the several-device sampler uses the official positions\n"
            "Fix: set positions to 'official (diffusers)' on the DiT loader"
        )
    options = dit.model_options.get("transformer_options", {})
    if options.get("patches") or options.get("patches_replace") or options.get("wrappers"):
        notices.warn("model patches (block patches, wrappers) are not used by the several-device sampler")
    if dit.model_options.get("sampler_post_cfg_function") or dit.model_options.get("sampler_cfg_function"):
        notices.warn("CFG functions patched into the model are not used by the several-device sampler")


class QwenPixParallelSampler:
    DISPLAY_NAME = "Qwen-Image Sampler (several devices)"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The sampled latent (native layout).",)
    FUNCTION = "sample"
    DESCRIPTION = (
        "Samples one image on several devices at once: the image tokens are split over them (Ulysses sequence "
        "parallel), each device holding the whole DiT. Euler with true CFG (diffusers' per-token rescale) on "
        "the ModelSamplingAuraFlow shift schedule, as the core pipeline."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit": (DIT, {"tooltip": "A Qwen-Image MODEL from Load Qwen-Image Diffusion Model (no LoRAs)."}),
                "positive": ("CONDITIONING", {"tooltip": "What to draw / the edit instruction (one entry)."}),
                "negative": ("CONDITIONING", {"tooltip": "Used when cfg is above 1 (one entry)."}),
                "latent_image": ("LATENT", {"tooltip": "Sets the size and batch (text-to-image: full denoise)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Noise seed."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Sampling steps."}),
                "cfg": (
                    "FLOAT",
                    {"default": 4.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "True-CFG scale (1: off)."},
                ),
                "shift": (
                    "FLOAT",
                    {"default": 3.1, "min": 0.01, "max": 100.0, "step": 0.01, "tooltip": "Schedule shift (3.1)."},
                ),
                "devices": (
                    "STRING",
                    {
                        "default": "cuda:0,cuda:1",
                        "tooltip": "One device per worker, comma-separated (all CUDA: NCCL; cpu,cpu: gloo, for tests).",
                    },
                ),
            },
            "optional": {
                "dit_gb_per_device": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1024.0,
                        "step": 0.5,
                        "tooltip": "GB of each device the DiT may take; the blocks that do not fit stream from "
                        "host memory every step. 0: the whole DiT on each device.",
                    },
                ),
            },
        }

    def sample(self, dit, positive, negative, latent_image, seed, steps, cfg, shift, devices, dit_gb_per_device=0.0):
        cfg = checks.finite_number("cfg", cfg, "set cfg from 0 to 100 (4 is the official default)")
        shift = checks.finite_number("shift", shift, "set shift above 0 (3.1 as the official workflows)")
        devices = _devices(devices)
        inner = host.qwen_diffusion_model(dit, "dit")
        core = getattr(inner, "core", inner)
        _check_model(dit, core)
        if core.config.num_heads % len(devices):
            raise host.InputError(
                f"devices: {len(devices)} devices; this DiT's {core.config.num_heads} attention heads must split "
                f"evenly over them\nFix: use a number of devices that divides {core.config.num_heads} "
                "(the real model's 24: 2, 3, 4, 6 or 8)"
            )
        text_dim = core.config.text_dim
        cond = _conditioning("positive", positive, text_dim)
        uncond = _conditioning("negative", negative, text_dim) if cfg > 1.0 else None
        if not isinstance(latent_image, dict) or not torch.is_tensor(latent_image.get("samples")):
            raise host.InputError("latent_image: not a LATENT\nFix: connect Empty Latent (Qwen-Image)")
        if "noise_mask" in latent_image:
            notices.warn("latent_image: the noise mask is not used by the several-device sampler (full denoise)")
        latent = comfy.sample.fix_empty_latent_channels(dit, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index")).float()
        noise = noise[:, :, 0] if noise.ndim == 5 else noise  # [B, 16, h, w], unit variance in the model's space
        dtype = torch.float32 if all(torch.device(d).type == "cpu" for d in devices) else torch.bfloat16
        cond.embeds = cond.embeds.to(dtype)
        if uncond is not None:
            uncond.embeds = uncond.embeds.to(dtype)
        h, w = noise.shape[-2:]
        sigmas = make_sigmas(float(shift), steps, h * 8, w * 8)
        bar = comfy.utils.ProgressBar(steps)
        gb = checks.finite_number("dit_gb_per_device", dit_gb_per_device, "set it to 0 or the GB per device")
        latents = _workers(core, devices, int(gb * 1e9) if gb > 0 else None).run(
            jobs.sample, noise, cond, uncond, sigmas=sigmas, cfg_scale=cfg,
            check_interrupt=host.check_interrupt, on_progress=lambda i, n: bar.update_absolute(i, n),
        )  # fmt: skip
        bad = checks.describe_non_finite(latents)
        if bad:
            raise host.InputError(f"the latents hold NaN/inf: {bad}\nFix: compute in bf16 or fp32")
        out = dict(latent_image)
        out["samples"] = host.latent_to_comfy(latents).reshape(latent.shape)
        return (out,)


NODES = {"QwenPixParallelSampler": QwenPixParallelSampler}
