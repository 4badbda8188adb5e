"""Qwen-Image-Layered nodes: decompose a picture into RGBA layers (sampler) and decode them (RGBA IMAGE + MASK).

`Qwen-Image Layered Sampler` takes the layered MODEL (from the ordinary DiT loader), the RGBA VAE, the prompt
and negative CONDITIONING (Qwen-Image Text Encode: the Layered model uses the text-to-image template) and
the picture, and returns a LATENT of N + 1 frames [1, 16, N + 1, h, w] (frame 0: the composite). ComfyUI
0.3.75 has no layered latents (EmptyQwenImageLayeredLatentImage, LatentCutToBatch came with ComfyUI 0.6), so
its KSampler cannot drive this model: the sampler runs the core's Euler loop (`qwen_image_core.layered`, the
reference pipeline's schedule and guidance) on the MODEL's weights as ComfyUI loaded them (LoRAs applied,
ComfyUI's attention dispatch); other model patches are reported as unused.

`Qwen-Image Layered Decode` turns that LATENT into the layers as an RGBA IMAGE batch [N, H, W, 4] (SaveImage
writes RGBA PNGs), their alpha as a MASK batch in ComfyUI's convention (1 - alpha, as Load Image gives), and
the composite frame.
"""

from __future__ import annotations

import comfy.model_management as mm
import comfy.utils
import torch

from ..qwen_image_core import layered
from ..qwen_image_core.costs import DiTWorkload
from ..qwen_image_core.offload_plan import sampling_bytes
from ..qwen_image_core.vae import denormalize_latents, normalize_latents
from . import checks, host, inputs, native_model, notices, placement
from .image import _tiling, _tiling_inputs
from .loaders import DIT, VAE

CATEGORY = "QwenPix/layered"
RESOLUTIONS = [str(r) for r in layered.RESOLUTIONS]
USED_COND_KEYS = {"attention_mask", "pooled_output"}  # pooled_output: set by every encoder, Qwen has none
VAE_FIX = "load qwen_image_layered_vae with 'Load Qwen-Image VAE'"
BRIDGE_NOTE = (
    "ComfyUI 0.3.75 cannot express layered latents (its layered latent nodes came in ComfyUI 0.6), so "
    "KSampler and the Qwen-Image Sampler cannot run this model; this node samples it."
)


def _named(check, fix: str) -> None:
    """Run a core check whose message names the input; as an InputError with the fix."""
    try:
        check()
    except ValueError as e:
        raise host.InputError(f"{e}\nFix: {fix}") from None


def _text(name: str, conditioning, text_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embeddings [1, T, D], key mask or None) of a one-entry CONDITIONING; anything else named."""
    checks.check_conditioning(name, conditioning, text_dim)
    if len(conditioning) != 1:
        raise host.InputError(
            f"{name}: {len(conditioning)} conditioning entries; the Layered sampler takes one prompt\n"
            f"Fix: connect one Qwen-Image Text Encode output to {name}"
        )
    embeds, extra = conditioning[0]
    if embeds.shape[0] != 1:
        raise host.InputError(f"{name}: a batch of {embeds.shape[0]} prompts\nFix: encode one prompt")
    for key in sorted(set(extra) - USED_COND_KEYS):
        notices.warn(f"{name}: conditioning key '{key}' is not used by the Layered sampler; it has no effect")
    mask = extra.get("attention_mask")
    if mask is not None:
        mask = mask.reshape(embeds.shape[:2]).bool()
        mask = None if bool(mask.all()) else mask
    return embeds.float(), mask


def _picture(image, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The picture [H, W, 3|4] and its alpha [H, W] (from `mask`: 1 - mask, or the image's 4th channel)."""
    checks.check_image("image", image)
    if image.shape[0] != 1:
        raise host.InputError(f"image: a batch of {image.shape[0]} pictures\nFix: decompose one picture at a time")
    if image.shape[-1] not in (3, 4):
        raise host.InputError(f"image: {image.shape[-1]} channels; RGB or RGBA pictures only\nFix: load a colour image")
    pic = image[0].float().cpu()
    if mask is None:
        return pic, None
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3) or (mask.dim() == 3 and mask.shape[0] != 1):
        got = checks.describe_value(mask)
        raise host.InputError(f"mask: expected one MASK [1, H, W], got {got}\nFix: connect Load Image's MASK")
    m = mask.reshape(mask.shape[-2:]).float().cpu()
    if tuple(m.shape) != tuple(pic.shape[:2]) and not bool(m.any()):
        return pic, None  # Load Image's stand-in for a picture without alpha: an empty 64x64 mask
    if tuple(m.shape) != tuple(pic.shape[:2]):
        raise host.InputError(
            f"mask: {list(m.shape)} pixels, the image has {list(pic.shape[:2])}\nFix: use the mask of this image"
        )
    return pic[..., :3], 1.0 - m


def _unused_patches(model) -> None:
    options = model.model_options.get("transformer_options", {})
    if options.get("patches") or options.get("patches_replace") or options.get("wrappers"):
        notices.warn("model patches (block patches, wrappers) are not used by the Layered sampler")
    if model.model_options.get("sampler_post_cfg_function") or model.model_options.get("sampler_cfg_function"):
        notices.warn("CFG functions patched into the model are not used; the Layered sampler's cfg_normalize is")
    if "model_sampling" in model.object_patches:
        notices.warn("the model's sampling (e.g. ModelSamplingAuraFlow) is not used: the Layered schedule is fixed")


class QwenPixLayeredSampler:
    DISPLAY_NAME = "Qwen-Image Layered Sampler"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Layered latent [1, 16, layers + 1, h, w] (frame 0: the composite): 'Layered Decode' it.",)
    FUNCTION = "sample"
    DESCRIPTION = (
        "Decomposes a picture into RGBA layers with Qwen-Image-Layered (the official pipeline's resize, schedule "
        "and CFG). " + BRIDGE_NOTE
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit": (DIT, {"tooltip": "A Qwen-Image-Layered MODEL (qwen_image_layered_bf16 / _fp8mixed)."}),
                "vae": (VAE, {"tooltip": "The RGBA VAE (qwen_image_layered_vae) from 'Load Qwen-Image VAE'."}),
                "positive": ("CONDITIONING", {"tooltip": "A caption of the picture (Qwen-Image Text Encode)."}),
                "negative": ("CONDITIONING", {"tooltip": "Used when cfg > 1 (the official negative is ' ')."}),
                "image": ("IMAGE", {"tooltip": "The picture to decompose (RGB, or RGBA)."}),
                "layers": ("INT", {"default": 4, "min": 1, "max": layered.MAX_LAYERS, "tooltip": "RGBA layers."}),
                "resolution": (
                    RESOLUTIONS,
                    {"tooltip": "About 640² pixels (recommended) or 1024², at the picture's aspect."},
                ),  # fmt: skip
                "seed": inputs.seed(),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Euler steps (official: 50)."}),
                "cfg": inputs.true_cfg("True-CFG scale (official: 4); 1 or less skips the negative pass."),
                "cfg_normalize": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Rescale each guided token to the norm of the conditional one "
                        "(the reference's cfg_normalize).",
                    },
                ),  # fmt: skip
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "The picture's alpha as Load Image's MASK (alpha = 1 - mask)."}),
            },
        }

    def sample(self, dit, vae, positive, negative, image, layers, resolution, seed, steps, cfg, cfg_normalize,
               mask=None):  # fmt: skip
        inner = host.qwen_diffusion_model(dit, "dit")
        core = getattr(inner, "core", inner)
        _named(lambda: layered.check_dit(core, "dit"), "load qwen_image_layered_bf16 or _fp8mixed with the DiT loader")
        _named(lambda: layered.check_vae(vae, "vae"), VAE_FIX)
        _named(lambda: layered.check_layers(layers), f"set layers from 1 to {layered.MAX_LAYERS}")
        if str(resolution) not in RESOLUTIONS:
            raise host.InputError(f"resolution '{resolution}': not one of {', '.join(RESOLUTIONS)}\nFix: choose 640")
        if dit.object_patches.get("diffusion_model.positions", "official") != "official":
            raise host.InputError(
                "dit: loaded with positions 'ComfyUI native'; Qwen-Image-Layered has only the official positions\n"
                "Fix: set positions to 'official (diffusers)' on the DiT loader"
            )
        cfg = checks.finite_number("cfg", cfg, "set cfg from 0 to 100 (4 is the official default)")
        cond, cond_mask = _text("positive", positive, core.config.text_dim)
        uncond, uncond_mask = _text("negative", negative, core.config.text_dim) if cfg > 1.0 else (None, None)
        picture, alpha = _picture(image, mask)
        _unused_patches(dit)

        pixels = layered.prepare_image(picture, int(resolution), alpha)
        height, width = pixels.shape[-2:]
        with placement.vae_on_device(vae) as device:
            image_latent = vae.encode(pixels.to(device), check=host.node_progress()).float()
        dtype = dit.model_dtype() or torch.float32
        wl = DiTWorkload(width, height * (layers + 1), 1, False, cond.shape[1], ((width, height),),
                         dtype.itemsize, dtype == torch.float16)  # fmt: skip
        dit.model.last_workload = wl
        mm.load_models_gpu([dit], memory_required=sampling_bytes(wl, core.config.hidden, core.config.mlp_dim))
        noise = layered.layered_noise(1, layers, height, width, seed)
        sigmas = layered.layered_sigmas(steps, tuple(image_latent.shape[-2:]))
        bar = comfy.utils.ProgressBar(steps)

        def on_step(i, total, x, x0):
            host.check_interrupt()
            bar.update_absolute(i + 1, total)

        options = dit.model_options.get("transformer_options", {})
        latents = layered.sample_layers(
            core, noise, image_latent, cond.to(dtype), cond_mask, None if uncond is None else uncond.to(dtype),
            uncond_mask, sigmas, cfg, bool(cfg_normalize), on_step, attention_fn=native_model.host_attention(options),
        )  # fmt: skip
        bad = checks.describe_non_finite(latents)
        if bad:
            raise host.InputError(f"the layered latents hold NaN/inf: {bad}\nFix: compute in bf16 or fp32 (loader)")
        return ({"samples": to_comfy(latents)},)


def to_comfy(latents: torch.Tensor) -> torch.Tensor:
    """Normalised layered latents [B, 16, F, h, w] -> ComfyUI's raw layout, on the intermediate device."""
    frames = latents.float().transpose(1, 2)  # [B, F, 16, h, w]
    raw = denormalize_latents(frames.flatten(0, 1)).unflatten(0, frames.shape[:2]).transpose(1, 2)
    return raw.to(host.intermediate_device())


def to_core(raw: torch.Tensor) -> torch.Tensor:
    frames = raw.float().transpose(1, 2)
    return normalize_latents(frames.flatten(0, 1)).unflatten(0, frames.shape[:2]).transpose(1, 2)


class QwenPixLayeredDecode:
    DISPLAY_NAME = "Qwen-Image Layered Decode"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK", "IMAGE")
    RETURN_NAMES = ("layers", "layer_masks", "composite")
    OUTPUT_TOOLTIPS = (
        "The RGBA layers as one IMAGE batch [layers, H, W, 4]: SaveImage writes RGBA PNGs.",
        "Each layer's alpha as a MASK batch, in ComfyUI's convention (1 - alpha, as Load Image gives).",
        "The composite frame the model denoised with the layers (RGBA).",
    )
    FUNCTION = "decode"
    DESCRIPTION = "Decodes a layered latent (Qwen-Image Layered Sampler) with the RGBA VAE into RGBA layers and masks."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": (VAE, {"tooltip": "The RGBA VAE (qwen_image_layered_vae)."}),
                "samples": ("LATENT", {"tooltip": "From the Qwen-Image Layered Sampler."}),
                **_tiling_inputs(),
            }
        }

    def decode(self, vae, samples, tiling, tile_size, overlap):
        tile = _tiling(tiling, tile_size, overlap)
        _named(lambda: layered.check_vae(vae, "vae"), VAE_FIX)
        raw = samples.get("samples") if isinstance(samples, dict) else None
        if not isinstance(raw, torch.Tensor) or raw.dim() != 5 or raw.shape[1] != 16 or raw.shape[2] < 2:
            got = list(raw.shape) if isinstance(raw, torch.Tensor) else checks.describe_value(samples)
            raise host.InputError(
                f"samples: {got} is not a layered latent [B, 16, layers + 1, h, w]\n"
                "Fix: connect the Qwen-Image Layered Sampler (ordinary latents go to Qwen-Image VAE Decode)"
            )
        with placement.vae_on_device(vae) as device:
            layers, composite = layered.decode_layers(
                vae, to_core(raw).to(device), tile=tile, check=host.node_progress()
            )
        out = lambda t: t.movedim(1, -1).to(host.intermediate_device())  # [B, H, W, 4] in [0, 1]
        rgba = out(layers)
        return (rgba, 1.0 - rgba[..., 3], out(composite))


NODES = {"QwenPixLayeredSampler": QwenPixLayeredSampler, "QwenPixLayeredDecode": QwenPixLayeredDecode}
