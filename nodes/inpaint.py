"""Masked editing nodes: crop an image to its mask, repaint the crop at full resolution with any edit or sampling
graph, and stitch only the masked pixels back (the community's CropAndStitch habit, built in).

Two ways to use it: 'Qwen-Image Edit Encode' with a mask (it crops Picture 1 itself and emits the crop record,
`edit_crop` below) -> sampler -> decode -> 'Stitch Into Original' (edited + crop); or the explicit pair
'Crop To Mask' -> any graph -> 'Stitch Into Original' (original, edited, mask, crop).

The numerics live in `qwen_image_core.inpaint` (`crop_region`, `stitch`); resizes use ComfyUI's `common_upscale`.
Outside the mask the stitched image holds the original's values exactly (any size, any mask shape).
"""

from __future__ import annotations

import comfy.utils
import torch

from ..qwen_image_core.inpaint import crop_region, stitch
from . import checks, notices
from .checks import InputError

CATEGORY = "QwenPix/inpaint"
# {"box": (left, top, right, bottom), "size": (width, height), "work_size": (width, height)}; from Edit Encode
# also "original" (IMAGE [1, H, W, C]) and "mask" (MASK [1, H, W]), so Stitch needs only the edit and the record
CROP = "QWENPIX_CROP"
MASK_MODES = {
    "crop to mask": True,  # edit the padded mask box at ~megapixels, stitch it back
    "whole image": False,  # edit the whole picture, stitch back only the masked pixels
}
REFERENCE_MODES = {"whole": False, "crop like Picture 1": True}


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


def _crop(image: torch.Tensor, m: torch.Tensor, padding: int, megapixels: float):
    """image [B, H, W, C], m [B|1, H, W] -> (crop, crop mask, record) for the union of the masks' padded boxes."""
    h, w = image.shape[1:3]
    region = crop_region(m.amax(0).cpu().numpy(), padding, int(megapixels * 1024 * 1024))
    box = region.box if region is not None else (0, 0, w, h)
    work = region.work_size if region is not None else (max(16, w // 16 * 16), max(16, h // 16 * 16))
    x0, y0, x1, y1 = box
    crop = _resize(image[:, y0:y1, x0:x1], *work)
    crop_mask = _resize(m[:, y0:y1, x0:x1, None], *work, "bilinear")[..., 0].clamp(0, 1)
    return crop, crop_mask, {"box": box, "size": (w, h), "work_size": work}


# Edit Encode's optional inputs for a masked edit (nodes/conditioning.py adds them to its optional group)
EDIT_INPUTS = {
    "mask": (
        "MASK",
        {
            "tooltip": "Optional: 1 where Picture 1 may change. Connect the node's 'crop' output to 'Qwen-Image "
            "Stitch Into Original' to put the edit back: pixels outside the mask stay exactly as they are. Give "
            "the negative prompt's Edit Encode the same mask."
        },
    ),
    "mask_mode": (
        list(MASK_MODES),
        {
            "tooltip": "With a mask: 'crop to mask' edits only the masked area plus padding, resized to about "
            "'megapixels' (full resolution for small areas); 'whole image' edits all of Picture 1 as without a "
            "mask and Stitch keeps only the masked pixels."
        },
    ),
    "padding": ("INT", {"default": 32, "min": 0, "max": 1024, "tooltip": "Crop to mask: context pixels around it."}),
    "megapixels": (
        "FLOAT",
        {"default": 1.0, "min": 0.0625, "max": 4.0, "step": 0.0625, "tooltip": "Crop to mask: size of the crop."},
    ),
    "references": (
        list(REFERENCE_MODES),
        {
            "tooltip": "Crop to mask: 'whole' uses Picture 2..10 uncropped (other pictures: a face, an object, a "
            "style); 'crop like Picture 1' cuts each the same way (maps aligned with Picture 1, e.g. its depth or "
            "pose; each must have Picture 1's size)."
        },
    ),
}


def edit_crop(images: list[tuple[str, torch.Tensor]], mask, mask_mode="crop to mask", padding=32, megapixels=1.0,
              references="whole"):  # fmt: skip
    """Edit Encode's masked edit: [(input name, IMAGE [B, H, W, C])] (Picture 1 first) -> (the images to encode,
    the crop record for Stitch, or None without a mask). The first image of each batch is used, with the mask's
    first (a batch of 1 or Picture 1's). Picture 1 (and with 'crop like Picture 1' every reference) is cut to the
    padded mask box at ~megapixels; an empty mask keeps Picture 1 whole (a warning)."""
    if mask is None:
        return images, None
    for key, table in (("mask_mode", MASK_MODES), ("references", REFERENCE_MODES)):
        value = {"mask_mode": mask_mode, "references": references}[key]
        if value not in table:
            raise InputError(f"{key}: {value!r} is not one of {', '.join(map(repr, table))}")
    m = _mask("mask", mask, images[0][1])[:1]  # the first image's mask: Edit Encode takes the first of a batch
    first = images[0][1][:1]
    h, w = first.shape[1:3]
    record = {"box": (0, 0, w, h), "size": (w, h), "work_size": (w, h), "original": first, "mask": m}
    if not MASK_MODES[mask_mode]:
        return images, record
    if not (m > 0).any():
        notices.warn("Edit Encode: the mask is empty, so nothing will be repainted: Picture 1 is encoded whole and "
                     "Stitch returns it unchanged")  # fmt: skip
        return images, record
    crop, _, info = _crop(first, m, padding, megapixels)
    out = [(images[0][0], crop)]
    for name, im in images[1:]:
        if REFERENCE_MODES[references]:
            if tuple(im.shape[1:3]) != (h, w):
                raise InputError(
                    f"{name} is {im.shape[2]}x{im.shape[1]} pixels; 'crop like Picture 1' cuts it with Picture 1's "
                    f"mask box, so it needs Picture 1's size {w}x{h}\nFix: resize {name} to {w}x{h}, or set "
                    "references to 'whole'"
                )
            x0, y0, x1, y1 = info["box"]
            im = _resize(im[:1, y0:y1, x0:x1], *info["work_size"])
        out.append((name, im))
    return out, {**record, **info}


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
        return _crop(image, _mask("mask", mask, image), padding, megapixels)


class QwenPixMaskStitch:
    DISPLAY_NAME = "Qwen-Image Stitch Into Original"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The original with the masked pixels from the edited crop (unmasked pixels unchanged).",)
    FUNCTION = "stitch"
    DESCRIPTION = (
        "Resizes the edited crop back to its box and pastes it where the mask is set (blended by soft masks); "
        "every pixel where the mask is 0 keeps the original's value exactly. The crop comes from 'Qwen-Image Edit "
        "Encode' (with a mask; original and mask are then optional) or from 'Crop To Mask'."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "edited": ("IMAGE", {"tooltip": "The edited crop (any size: it is resized back to the box)."}),
                "crop": (CROP, {"tooltip": "From 'Qwen-Image Edit Encode' (given a mask) or 'Crop To Mask'."}),
            },
            "optional": {
                "original": (
                    "IMAGE",
                    {"tooltip": "The image that was cropped (needed with 'Crop To Mask'; Edit Encode's crop has it)."},
                ),
                "mask": (
                    "MASK",
                    {"tooltip": "The mask that was used (needed with 'Crop To Mask'; Edit Encode's crop holds it)."},
                ),
            },
        }

    def stitch(self, edited, crop, original=None, mask=None):
        checks.check_image("edited", edited)
        if crop is None:  # Edit Encode without a mask
            raise InputError(
                "crop: the Edit Encode it comes from has no mask, so there is nothing to stitch back\nFix: connect "
                "a mask to that Edit Encode (and the negative prompt's), or save the decoded edit directly"
            )
        if not isinstance(crop, dict) or "box" not in crop:
            raise InputError(f"crop: expected a crop record, got {checks.describe_value(crop)}")
        for name, value in (("original", original), ("mask", mask)):
            if value is None and crop.get(name) is None:
                raise InputError(
                    f"{name}: not connected, and the crop (from 'Crop To Mask') does not hold it\nFix: connect "
                    f"the {name} that went into 'Crop To Mask'"
                )
        original = crop["original"] if original is None else original
        checks.check_image("original", original)
        m = _mask("mask", crop["mask"] if mask is None else mask, original)
        w, h = original.shape[2], original.shape[1]
        if tuple(crop.get("size", ())) != (w, h):
            raise InputError(
                f"crop: made for a {crop.get('size')} image, the original is {(w, h)}\nFix: connect the original "
                "that was cropped"
            )
        n = max(edited.shape[0], original.shape[0])  # Edit Encode's original is one image; a sampler batch fans out
        if edited.shape[0] not in (1, n) or original.shape[0] not in (1, n):
            raise InputError(f"edited has a batch of {edited.shape[0]}; the original has {original.shape[0]}")
        if edited.shape[-1] != original.shape[-1]:
            raise InputError(f"edited has {edited.shape[-1]} channels; the original has {original.shape[-1]}")
        box = crop["box"]
        back = _resize(edited.float(), box[2] - box[0], box[3] - box[1]).clamp(0, 1).to(original)
        out = [
            stitch(original[min(i, len(original) - 1)], back[min(i, len(back) - 1)], m[min(i, len(m) - 1)], box)
            for i in range(n)
        ]
        return (torch.stack(out),)


NODES = {"QwenPixMaskCrop": QwenPixMaskCrop, "QwenPixMaskStitch": QwenPixMaskStitch}
