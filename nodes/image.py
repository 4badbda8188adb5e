"""VAE nodes: decode latents to images and encode images to latents, tiled when memory asks for it."""

from __future__ import annotations

from ..qwen_image_core.vae import Tiling
from . import checks, host, placement
from .loaders import VAE

CATEGORY = "QwenPix/latent"
TILING = ["auto", "off", "on"]


def _tiling(mode: str, tile_size: int, overlap: int):
    """The core's tiling argument from the node's inputs, checked with the inputs' own names and values."""
    if mode not in TILING:
        raise host.InputError(f"tiling '{mode}': not one of {', '.join(TILING)}\nFix: choose one of {TILING}")
    if mode != "on":
        return {"auto": "auto", "off": False}[mode]
    for name, v, low in (("tile_size", tile_size, 128), ("overlap", overlap, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low or v % 8:
            raise host.InputError(
                f"{name} '{v}': tiles are cut in latent pixels, so {name} must be a multiple of 8"
                + (f" of at least {low}" if low else " (0 or more)")
                + f"\nFix: set {name} to {max(low, int(v) // 8 * 8) if isinstance(v, int) else low}"
            )
    if overlap * 2 > tile_size:
        raise host.InputError(
            f"overlap '{overlap}': at most half of tile_size '{tile_size}'\nFix: lower overlap to "
            f"{tile_size // 2 // 8 * 8} or less, or raise tile_size to {overlap * 2} or more"
        )
    return Tiling(tile_size, overlap)


def _tiling_inputs() -> dict:
    return {
        "tiling": (
            TILING,
            {"tooltip": "auto: tile only when the memory estimate does not fit; on: always; off: never."},
        ),
        "tile_size": (
            "INT",
            {
                "default": 512,
                "min": 128,
                "max": 4096,
                "step": 64,
                "tooltip": "Tile side in pixels when tiling is 'on'.",
            },
        ),
        "overlap": (
            "INT",
            {
                "default": 64,
                "min": 0,
                "max": 512,
                "step": 8,
                "tooltip": "Blended overlap between tiles in pixels when tiling is 'on'.",
            },
        ),
    }


class QwenPixDecode:
    DISPLAY_NAME = "Qwen-Image VAE Decode"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded images.",)
    FUNCTION = "decode"
    DESCRIPTION = "Decodes Qwen-Image latents with the 2D image VAE (tiled automatically for large images)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": (VAE, {"tooltip": "From 'Load Qwen-Image VAE'."}),
                "samples": ("LATENT", {"tooltip": "Latents from a sampler (ours or KSampler)."}),
                **_tiling_inputs(),
            }
        }

    def decode(self, vae, samples, tiling, tile_size, overlap):
        tile = _tiling(tiling, tile_size, overlap)
        raw = checks.check_latent("samples", samples)
        with placement.vae_on_device(vae) as device:
            latents = host.latent_to_core(raw).to(device)
            images = vae.decode(latents, tile=tile, check=host.node_progress())  # progress + interrupt per tile
        return (host.image_to_comfy(images),)


class QwenPixEncode:
    DISPLAY_NAME = "Qwen-Image VAE Encode"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Latents of the image, for img2img (sampler denoise < 1).",)
    FUNCTION = "encode"
    DESCRIPTION = "Encodes images to Qwen-Image latents (sides not a multiple of 8 are edge-padded)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": (VAE, {"tooltip": "From 'Load Qwen-Image VAE'."}),
                "image": ("IMAGE", {"tooltip": "The images to encode."}),
                **_tiling_inputs(),
            }
        }

    def encode(self, vae, image, tiling, tile_size, overlap):
        tile = _tiling(tiling, tile_size, overlap)
        checks.check_image("image", image)
        with placement.vae_on_device(vae) as device:
            latents = vae.encode(host.image_to_core(image).to(device), tile=tile, check=host.node_progress())
        return ({"samples": host.latent_to_comfy(latents)},)


NODES = {"QwenPixDecode": QwenPixDecode, "QwenPixEncode": QwenPixEncode}
