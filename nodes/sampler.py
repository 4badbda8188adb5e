"""The sampler node: flow-matching Euler with true CFG, progress, live previews and interruption."""

from __future__ import annotations

import logging

import torch

from ..qwen_image_core.offload_plan import DiTWorkload, sampling_bytes
from ..qwen_image_core.pipeline import Conditioning, make_sigmas, sample
from . import checks, host, placement
from .loaders import DIT

CATEGORY = "QwenPix/sampling"
SCHEDULES = ["shift (ComfyUI workflows)", "dynamic (diffusers official)", "lightning (4/8-step LoRAs)"]
RESCALES = {"norm (diffusers)": "norm", "CFGNorm (ComfyUI)": "cfgnorm", "none": None}
SAMPLERS = ["euler"]


def conditioning_to_core(
    conditioning: list, dtype: torch.dtype, device: torch.device, name: str = "positive", text_dim: int | None = None
) -> Conditioning:
    """ComfyUI CONDITIONING (ours or native Qwen nodes') -> embeddings, mask and normalised reference latents."""
    checks.check_conditioning(name, conditioning, text_dim)  # structure, sizes, finite values, mask, references
    if len(conditioning) > 1:
        logging.warning("QwenPix sampler: using the first of %d conditioning entries", len(conditioning))
    embeds, extra = conditioning[0]
    mask = extra.get("attention_mask")
    mask = None if mask is None or bool(mask.all()) else mask.to(device=device, dtype=torch.bool)
    refs = [host.latent_to_core(r).to(device) for r in extra.get("reference_latents") or []]
    return Conditioning(embeds.to(device=device, dtype=dtype), mask, refs or None)


class QwenPixSampler:
    DISPLAY_NAME = "Qwen-Image Sampler"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The sampled latent (native layout: VAE Decode works on it too).",)
    FUNCTION = "sample"
    DESCRIPTION = "Samples Qwen-Image with true CFG (cond and uncond batched in one pass) and Euler steps."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit": (DIT, {"tooltip": "The diffusion model (with any LoRAs)."}),
                "positive": ("CONDITIONING", {"tooltip": "What to draw / the edit instruction."}),
                "negative": ("CONDITIONING", {"tooltip": "Used when cfg > 1 (the official negative prompt is ' ')."}),
                "latent_image": (
                    "LATENT",
                    {"tooltip": "Empty latent (sets the size) or an encoded image for img2img."},
                ),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Noise seed."}),
                "steps": (
                    "INT",
                    {
                        "default": 20,
                        "min": 1,
                        "max": 1000,
                        "tooltip": "Sampling steps (official: 50; ComfyUI workflows: 20; Lightning: 4 or 8).",
                    },
                ),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 4.0,
                        "min": 1.0,
                        "max": 30.0,
                        "step": 0.1,
                        "tooltip": "True-CFG scale; 1 skips the negative pass (Lightning LoRAs use 1).",
                    },
                ),
                "sampler_name": (SAMPLERS, {"tooltip": "Euler on the flow velocity (what the references use)."}),
                "schedule": (
                    SCHEDULES,
                    {
                        "tooltip": "shift: ComfyUI's ModelSamplingAuraFlow + simple. dynamic: "
                        "diffusers' resolution-dependent shift. lightning: plain shift 3."
                    },
                ),
                "shift": (
                    "FLOAT",
                    {
                        "default": 3.1,
                        "min": 0.01,
                        "max": 100.0,
                        "step": 0.01,
                        "tooltip": "Shift for the 'shift' schedule (official workflows: 3.1; edit: 3).",
                    },
                ),
                "cfg_rescale": (
                    list(RESCALES),
                    {
                        "tooltip": "How guided predictions are rescaled: diffusers' "
                        "per-token norm, ComfyUI's CFGNorm, or none."
                    },
                ),
                "denoise": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Below 1 keeps part of the input latent (img2img).",
                    },
                ),
            }
        }

    def sample(
        self,
        dit,
        positive,
        negative,
        latent_image,
        seed,
        steps,
        cfg,
        sampler_name,
        schedule,
        shift,
        cfg_rescale,
        denoise,
    ):
        cfg = checks.finite_number("cfg", cfg, "set cfg from 1 to 30 (4 is the official default; 1 for Lightning)")
        denoise = checks.finite_number("denoise", denoise, "set denoise from 0 to 1 (1 for text-to-image)")
        shift = checks.finite_number("shift", shift, "set shift above 0 (official: 3.1; edit: 3)", above=0)
        device = host.compute_device()
        dtype = host.compute_dtype(dit.compute_dtype, device)
        cfg_dit = dit.model.config
        cond = conditioning_to_core(positive, dtype, device, "positive", cfg_dit.text_dim)
        uncond = conditioning_to_core(negative, dtype, device, "negative", cfg_dit.text_dim) if cfg > 1.0 else None
        shape = latent_image["samples"].shape
        height, width = shape[-2] * 8, shape[-1] * 8
        refs = tuple((r.shape[-1] * 8, r.shape[-2] * 8) for r in cond.ref_latents or ())
        workload = DiTWorkload(
            width,
            height,
            shape[0],
            uncond is not None,
            int(cond.embeds.shape[1]),
            refs,
            compute_bytes=torch.finfo(dtype).bits // 8,
            fp16=dtype == torch.float16,
        )
        check_memory(workload, cfg_dit, device)
        with host.input_problem(
            "latent_image", f"{list(shape)}", "use a latent from Empty Latent (Qwen-Image) or VAE Encode"
        ):
            latent = host.latent_to_core(latent_image["samples"])
        kind = schedule.split(" ")[0]
        sigmas = make_sigmas(shift if kind == "shift" else kind, steps, height, width, denoise)
        if len(sigmas) < 2:
            return (latent_image,)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))  # as ComfyUI: CPU noise
        planner = placement.dit_planner(dit.model, workload)
        guard = FiniteGuard(host.StepReporter(len(sigmas) - 1), dit.compute_dtype, dtype, dit, {"latent_image": latent})

        def run():
            return sample(
                dit.model,
                noise,
                cond,
                uncond,
                sigmas=sigmas,
                cfg_scale=cfg,
                cfg_rescale=RESCALES[cfg_rescale],
                latents=latent,
                callback=guard,
                loras=dit.loras,
            )

        with placement.on_device(dit.model, dit.model.transformer_blocks, dit.runtime, planner) as placed:
            out = run() if placed is None else placed.run(run)  # on out-of-memory: re-plan, retry once
        guard.check(out, len(sigmas) - 2, len(sigmas) - 1)
        return ({**latent_image, "samples": host.latent_to_comfy(out)},)


def check_memory(workload: DiTWorkload, cfg, device: torch.device) -> None:
    """Refuse, before allocating anything, a job whose activations cannot fit the device at all."""
    need = sampling_bytes(workload, cfg.hidden, cfg.mlp_dim)
    room = host.memory_room(device)
    if need > room:
        raise host.InputError(
            f"latent_image: batch {workload.batch} at {workload.width}x{workload.height} pixels "
            f"({workload.describe()}) needs about {need / 2**30:.1f} GiB for sampling, but {device.type} has "
            f"{room / 2**30:.1f} GiB\nFix: lower batch_size or the image size on the latent node"
        )


class FiniteGuard:
    """A step callback that stops sampling with the reason as soon as the latents stop being finite numbers."""

    def __init__(self, inner, choice: str, dtype: torch.dtype, dit=None, inputs=None):
        self.inner, self.choice, self.dtype, self.dit, self.inputs = inner, choice, dtype, dit, inputs

    def __call__(self, i: int, steps: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        self.check(x, i, steps)
        self.inner(i, steps, x, denoised)

    def check(self, x: torch.Tensor, i: int, steps: int) -> None:
        if not bool(torch.isfinite(x).all()):  # stop with the likeliest cause it can see
            raise host.InputError(checks.non_finite_message(i, steps, self.dtype, self.choice, self.dit, self.inputs))


NODES = {"QwenPixSampler": QwenPixSampler}
