"""Conditioning nodes: prompts (and edit references) -> ComfyUI CONDITIONING in the native Qwen layout.

The output is `[[embeds [1, T, 3584], {"reference_latents": [raw latents [1, 16, 1, h, w], ...]}]]`, what
ComfyUI's own CLIPTextEncode / TextEncodeQwenImageEditPlus produce, so it drives a native KSampler too.
"""

from __future__ import annotations

import logging

import torch

from ..qwen_image_core.pipeline import prepare_references
from ..qwen_image_core.sizes import check_reference, latent_shape
from . import checks, host, inpaint, placement
from .loaders import TEXT_ENCODER, VAE

CATEGORY = "QwenPix/conditioning"
VARIANTS = {"edit_plus (2509 / 2511)": "edit_plus", "edit (original Qwen-Image-Edit)": "edit"}
RESIZES = {"official (~1 MP)": "official", "keep size (no shift/zoom)": "keep"}
MAX_IMAGES = 10  # Picture 1..10: as many as community packs offer for 2509 / 2511 (the core node has 3)


def _conditioning(embeds: torch.Tensor, extra: dict | None = None) -> list:
    return [[embeds.float().to(host.intermediate_device()), dict(extra or {})]]


class QwenPixTextEncode:
    DISPLAY_NAME = "Qwen-Image Text Encode"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Prompt embeddings (native Qwen-Image layout: works with KSampler too).",)
    FUNCTION = "encode"
    DESCRIPTION = "Encodes a text-to-image prompt (positive or negative) with Qwen2.5-VL and the official template."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (TEXT_ENCODER, {"tooltip": "From 'Load Qwen-Image Text Encoder'."}),
                "prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "dynamicPrompts": True,
                        "tooltip": "What to draw. For the negative prompt a single space is the official default.",
                    },
                ),
            }
        }

    def encode(self, text_encoder, prompt: str):
        embeds = text_encoder.encode([checks.check_text("prompt", prompt)], None, "t2i")
        return (_conditioning(embeds),)


class QwenPixEditEncode:
    DISPLAY_NAME = "Qwen-Image Edit Encode"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "LATENT", inpaint.CROP)
    RETURN_NAMES = ("conditioning", "latent", "crop")
    OUTPUT_TOOLTIPS = (
        "Instruction + reference images (native layout with reference_latents).",
        "An empty latent at the edit's output size, from image1: ~1 MP at its aspect ratio (official) or its own size "
        "(keep size); with 'crop to mask', from the crop.",
        "With a mask: for 'Qwen-Image Stitch Into Original' (edited + crop), which puts the decoded edit back into "
        "Picture 1 where the mask is set. Without a mask: nothing (Stitch refuses it).",
    )
    FUNCTION = "encode"
    DESCRIPTION = (
        f"Encodes an edit instruction with 1-{MAX_IMAGES} reference images ('Picture 1'..'Picture {MAX_IMAGES}' "
        "in the prompt) for Qwen-Image-Edit / 2509 / 2511; the canvas follows Picture 1. With a mask: "
        "'crop to mask' edits only the masked area of Picture 1 (plus padding) at ~megapixels, and 'Qwen-Image "
        "Stitch Into Original' on the decoded edit and the crop output pastes back only the masked pixels."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (
                    TEXT_ENCODER,
                    {"tooltip": "From 'Load Qwen-Image Text Encoder' (needs the vision tower)."},
                ),
                "vae": (VAE, {"tooltip": "Encodes the references into latents the model attends to."}),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The edit instruction."}),
                "image1": (
                    "IMAGE",
                    {"tooltip": "The image to edit ('Picture 1'); it sets the output size and aspect ratio."},
                ),
                "variant": (
                    list(VARIANTS),
                    {
                        "tooltip": "edit_plus: Qwen-Image-Edit-2509/2511 (several images, "
                        "'Picture N:' prompts). edit: the original Qwen-Image-Edit (one image)."
                    },
                ),
                "resize": (
                    list(RESIZES),
                    {
                        "tooltip": "official: references resized to ~1 MP like the reference "
                        "pipeline. keep size: references keep their pixels, which avoids the "
                        "shifted/zoomed outputs of the forced resize."
                    },
                ),
            },
            "optional": {
                **inpaint.EDIT_INPUTS,  # mask, mask_mode, padding, megapixels, references
                **{
                    f"image{i}": (
                        "IMAGE",
                        {"tooltip": f"Reference 'Picture {i}' (edit_plus only; 2509 works best with 1-3)."},
                    )
                    for i in range(2, MAX_IMAGES + 1)
                },
            },
        }

    def encode(self, text_encoder, vae, prompt: str, image1, variant: str, resize: str, **more):
        given = {f"image{i}": more.pop(f"image{i}") for i in range(2, MAX_IMAGES + 1) if f"image{i}" in more}
        masked = {k: more.pop(k) for k in inpaint.EDIT_INPUTS if k in more}
        if more:  # ComfyUI passes linked inputs the node does not declare (image11 sent through the API)
            extra = ", ".join(sorted(more))
            raise host.InputError(
                f"{extra}: not an input of this node, which takes at most {MAX_IMAGES} reference images "
                f"(image1..image{MAX_IMAGES}); {extra} would be ignored\nFix: remove {extra}, or combine images "
                "into one (e.g. side by side) before encoding"
            )
        checks.check_text("prompt", prompt)
        # in input order: a gap (image2 empty, image3 connected) numbers the pictures as connected, 1, 2, ...
        named = [("image1", image1)] + [
            (n, given[n]) for n in sorted(given, key=lambda n: int(n[5:])) if given[n] is not None
        ]
        for name, im in named:
            checks.check_image(name, im)
            if im.shape[0] > 1:
                logging.warning("QwenPix edit encode: %s is a batch of %d; using its first image", name, im.shape[0])
        # a mask crops Picture 1 (and aligned references) to its padded box; crop is the record for Stitch
        named, crop = inpaint.edit_crop(named, masked.pop("mask", None), **masked)
        for name, im in named:
            check_reference(name, im.shape[2], im.shape[1], RESIZES[resize] == "keep")
        images = [im[0] for _, im in named]  # first image of each batch
        fix = "use the 'edit_plus (2509 / 2511)' variant for several reference images, or keep only image1"
        with host.input_problem("variant", variant, fix):
            # the canvas follows Picture 1, as the official ComfyUI workflows size it (diffusers: the last image)
            refs = prepare_references(images, VARIANTS[variant], RESIZES[resize], canvas="first")
        template = "edit" if VARIANTS[variant] == "edit" else "edit_plus"
        embeds = text_encoder.encode([prompt], refs.vl_images, template)
        with placement.vae_on_device(vae) as device:
            latents = [
                host.latent_to_comfy(vae.encode(px.to(device), check=host.node_progress())) for px in refs.vae_pixels
            ]
        b, c, h, w = latent_shape(refs.width // 16 * 16, refs.height // 16 * 16, 1)
        empty = torch.zeros((b, c, 1, h, w), device=host.intermediate_device())
        return (_conditioning(embeds, {"reference_latents": latents}), {"samples": empty}, crop)


NODES = {"QwenPixTextEncode": QwenPixTextEncode, "QwenPixEditEncode": QwenPixEditEncode}
