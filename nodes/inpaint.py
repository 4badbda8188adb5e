"""Masked editing nodes: crop an image to its mask, repaint the crop at full resolution with any edit or sampling
graph, and stitch only the masked pixels back (the community's CropAndStitch habit, built in).

The numerics live in `qwen_image_core.inpaint` (`crop_region`, `stitch`); resizes use ComfyUI's `common_upscale`.
Outside the mask the stitched image holds the original's values exactly (any size, any mask shape).
"""

from __future__ import annotations

import comfy.utils
import torch

from ..qwen_image_core.inpaint import crop_region, stitch
from . import checks
from .checks import InputError

CATEGORY = "QwenPix/inpaint"
CROP = "QWENPIX_CROP"  # {"box": (left, top, right, bottom), "size": (width, height), "work_size": (width, height)}


def _mask(name: str, mask, image: torch.Tensor) -> torch.Tensor:
    """A MASK [B|1, H, W] of the image's size, else an error naming the input."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        raise InputError(f"{name}: expected a MASK [batch, height, width], got {checks.describe_value(mask)}")
    m = mask[None] if mask.ndim == 2 else mask
    if tuple(m.shape[-2:]) != tuple(image.shape[1:3]):
        raise InputError(
            f"{name} is {m.shape[-1]}x{m.shape[-2]} pixels; the image is {image.shape[2]}x{image.shape[1]}\n"
            "Fix: make the mask from this image (or resize it to the image's size)"
        )
    if m.shape[0] not in (1, image.shape[0]):
        raise InputError(f"{name} has a batch of {m.shape[0]}; the image has {image.shape[0]} (use 1 or the same)")
    return m.float().clamp(0, 1)


def _resize(image: torch.Tensor, width: int, height: int, method: str = "lanczos") -> torch.Tensor:
    """IMAGE [B, H, W, C] resized with ComfyUI's upscale (Lanczos for images, bilinear for masks)."""
    return comfy.utils.common_upscale(image.movedim(-1, 1), width, height, method, "disabled").movedim(1, -1)


class QwenPixMaskCrop:
    DISPLAY_NAME = "Qwen-Image Crop To Mask"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK", CROP)
    RETURN_NAMES = ("image", "mask", "crop")
    OUTPUT_TOOLTIPS = (
        "The masked area (plus padding), resized to about `megapixels` with sides multiples of 16: edit this.",
        "The mask of that crop.",
        "Where the crop came from, for 'Qwen-Image Stitch Into Original'.",
    )
    FUNCTION = "crop"
    DESCRIPTION = (
        "Cuts the masked area out of the image so an edit works on it at full resolution; 'Stitch Into Original' "
        "puts back only the masked pixels. An empty mask keeps the whole image (nothing to repaint)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image to edit."}),
                "mask": ("MASK", {"tooltip": "1 where the image may change (the union over a batch)."}),
                "padding": ("INT", {"default": 32, "min": 0, "max": 1024, "tooltip": "Context pixels around it."}),
                "megapixels": (
                    "FLOAT",
                    {"default": 1.0, "min": 0.0625, "max": 4.0, "step": 0.0625, "tooltip": "Size of the crop."},
                ),
            }
        }

    def crop(self, image, mask, padding, megapixels):
        checks.check_image("image", image)
        m = _mask("mask", mask, image)
        union = m.amax(0).cpu().numpy()
        h, w = image.shape[1:3]
        region = crop_region(union, padding, int(megapixels * 1024 * 1024))
        box = region.box if region is not None else (0, 0, w, h)
        work = region.work_size if region is not None else (max(16, w // 16 * 16), max(16, h // 16 * 16))
        x0, y0, x1, y1 = box
        crop = _resize(image[:, y0:y1, x0:x1], *work)
        crop_mask = _resize(m[:, y0:y1, x0:x1, None], *work, "bilinear")[..., 0].clamp(0, 1)
        return crop, crop_mask, {"box": box, "size": (w, h), "work_size": work}


class QwenPixMaskStitch:
    DISPLAY_NAME = "Qwen-Image Stitch Into Original"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The original with the masked pixels from the edited crop (unmasked pixels unchanged).",)
    FUNCTION = "stitch"
    DESCRIPTION = (
        "Resizes the edited crop back to its box and pastes it where the mask is set (blended by soft masks); "
        "every pixel where the mask is 0 keeps the original's value exactly."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "original": ("IMAGE", {"tooltip": "The image given to 'Crop To Mask'."}),
                "edited": ("IMAGE", {"tooltip": "The edited crop (any size: it is resized back to the box)."}),
                "mask": ("MASK", {"tooltip": "The mask given to 'Crop To Mask'."}),
                "crop": (CROP, {"tooltip": "From 'Qwen-Image Crop To Mask'."}),
            }
        }

    def stitch(self, original, edited, mask, crop):
        checks.check_image("original", original)
        checks.check_image("edited", edited)
        m = _mask("mask", mask, original)
        w, h = original.shape[2], original.shape[1]
        if tuple(crop.get("size", ())) != (w, h):
            raise InputError(
                f"crop: made for a {crop.get('size')} image, the original is {(w, h)}\nFix: connect the original "
                "that went into 'Crop To Mask'"
            )
        if edited.shape[0] not in (1, original.shape[0]):
            raise InputError(f"edited has a batch of {edited.shape[0]}; the original has {original.shape[0]}")
        if edited.shape[-1] != original.shape[-1]:
            raise InputError(f"edited has {edited.shape[-1]} channels; the original has {original.shape[-1]}")
        box = crop["box"]
        back = _resize(edited.float(), box[2] - box[0], box[3] - box[1]).clamp(0, 1).to(original)
        out = [
            stitch(original[i], back[min(i, len(back) - 1)], m[min(i, len(m) - 1)], box)
            for i in range(original.shape[0])
        ]
        return (torch.stack(out),)


NODES = {"QwenPixMaskCrop": QwenPixMaskCrop, "QwenPixMaskStitch": QwenPixMaskStitch}
