"""Latent nodes: an empty latent at an official aspect preset or a custom size."""

from __future__ import annotations

import comfy.model_management
import torch

from ..qwen_image_core.sizes import ASPECT_PRESETS, latent_shape

CATEGORY = "QwenPix/latent"
CUSTOM = "custom"
PRESET_NAMES = [f"{ratio} ({w}x{h})" for ratio, (w, h) in ASPECT_PRESETS.items()] + [CUSTOM]


class QwenPixEmptyLatent:
    DISPLAY_NAME = "Empty Latent (Qwen-Image)"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("An empty 16-channel latent; native VAE Decode and KSampler accept it too.",)
    FUNCTION = "make"
    DESCRIPTION = "An empty latent at one of Qwen-Image's official aspect presets, or at a custom size."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "aspect": (
                    PRESET_NAMES,
                    {
                        "default": PRESET_NAMES[0],
                        "tooltip": "Official Qwen-Image sizes (about 1.7 MP), or 'custom' to use width/height.",
                    },
                ),
                "width": (
                    "INT",
                    {
                        "default": 1024,
                        "min": 16,
                        "max": 16384,
                        "step": 16,
                        "tooltip": "Width in pixels when aspect is 'custom' (multiple of 16).",
                    },
                ),
                "height": (
                    "INT",
                    {
                        "default": 1024,
                        "min": 16,
                        "max": 16384,
                        "step": 16,
                        "tooltip": "Height in pixels when aspect is 'custom' (multiple of 16).",
                    },
                ),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images generated at once."}),
            }
        }

    def make(self, aspect: str, width: int, height: int, batch_size: int):
        if aspect != CUSTOM:
            width, height = ASPECT_PRESETS[aspect.split(" ")[0]]
        b, c, h, w = latent_shape(width, height, batch_size)
        # ComfyUI keeps Qwen-Image (Wan 2.1 VAE) latents as one-frame videos: [B, 16, 1, H/8, W/8]
        return ({"samples": torch.zeros((b, c, 1, h, w), device=comfy.model_management.intermediate_device())},)


NODES = {"QwenPixEmptyLatent": QwenPixEmptyLatent}
