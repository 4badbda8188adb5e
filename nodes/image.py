"""VAE nodes: decode latents to images and encode images to latents, tiled when memory asks for it."""

from __future__ import annotations

from ..qwen_image_core.vae import Tiling
from . import host, placement
from .loaders import VAE

CATEGORY = "QwenPix/latent"
TILING = ["auto", "off", "on"]


def _tiling(mode: str, tile_size: int, overlap: int):
    return {"auto": "auto", "off": False}.get(mode) or Tiling(tile_size, overlap)


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
        with placement.vae_on_device(vae) as device:
            latents = host.latent_to_core(samples["samples"]).to(device)
            images = vae.decode(latents, tile=_tiling(tiling, tile_size, overlap))
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
        with placement.vae_on_device(vae) as device:
            latents = vae.encode(host.image_to_core(image).to(device), tile=_tiling(tiling, tile_size, overlap))
        return ({"samples": host.latent_to_comfy(latents)},)


NODES = {"QwenPixDecode": QwenPixDecode, "QwenPixEncode": QwenPixEncode}
