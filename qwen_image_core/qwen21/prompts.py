"""Everything between a Qwen-Image-2.1 prompt (plus up to 10 reference images) and the Qwen3-VL encoder's inputs.

* the 2.1 chat template (one system prompt for text-to-image and editing) with the references addressed as
  `<image1>` ... `<image10>`, each followed by its image slot, as diffusers' `QwenImage21Pipeline` builds it;
* the leading tokens dropped from the features: the system block (counted with the tokenizer, as the reference
  derives it from the tokenized system message);
* the RGBA prompt wrapper that asks the model for a transparent background;
* references for the vision tower: RGBA composited over white (the VAE reads all four channels), then the
  Qwen3-VL processor's smart resize (multiples of 32), x/255, mean/std 0.5, 16-px patches;
* the official reference resize (about `resolution`^2 pixels, sides multiples of 32, Lanczos).

The tokenizer: Qwen3-VL's vocabulary and special-token ids equal Qwen2.5's for everything these templates
use, so v1's tokenizer finder and loader (`qwen_image_core.prompts`) serve both.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..prompts import IMAGE_SLOT, calculate_dimensions, to_pil, vision_patches

SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
SYSTEM_BLOCK = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"  # dropped from the features
TEMPLATE = SYSTEM_BLOCK + "<|im_start|>user\n{images}{prompt}<|im_end|>\n<|im_start|>assistant\n"
IMAGE_REFERENCE = "<image{}>" + IMAGE_SLOT  # one per reference, joined by single spaces
MAX_REFERENCES = 10  # references the model was trained to address (<image1> .. <image10>)

# The RGBA wrapper (QwenLM/Qwen-Image-2.1 README, as quoted in ecosystem.md §1.3: "This is an RGBA image with
# transparency. … The image has alpha channel and the background is transparent."). The quote elides what sits
# between the two sentences; the user's prompt is placed there. Not checked against the model card itself.
RGBA_OPENING = "This is an RGBA image with transparency."
RGBA_CLOSING = "The image has alpha channel and the background is transparent."

# Qwen3-VL's image processor: the Qwen2VLImageProcessor settings of the Qwen3-VL repos' preprocessor_config.json
# (size {shortest_edge 65536, longest_edge 16777216}, patch 16, merge 2, mean/std 0.5), as several public copies
# of it read; the Qwen-Image-2.1 repo's own processor/ folder was not available to compare with
PATCH, MERGE, TEMPORAL = 16, 2, 2  # patch side, merge block side, frames per patch
VL_MEAN = VL_STD = (0.5, 0.5, 0.5)
VL_MIN_PIXELS, VL_MAX_PIXELS = 65536, 16777216  # "shortest_edge" / "longest_edge" (areas, not sides)
RESIZE_MULTIPLE = 32  # official reference sides: one vision slot (2x2 patches of 16) = 2x2 latents of 16


def template_text(prompt: str, num_images: int = 0) -> str:
    """The chat text for one prompt with `num_images` references (0: text-to-image).

    An empty prompt becomes one space (the reference's rule: Qwen has no BOS token, so the encoder needs a token
    to read). More than MAX_REFERENCES references is refused.
    """
    if not 0 <= num_images <= MAX_REFERENCES:
        raise ValueError(
            f"Qwen-Image-2.1 takes at most {MAX_REFERENCES} reference images (<image1> .. <image{MAX_REFERENCES}>), "
            f"got {num_images}"
        )
    images = " ".join(IMAGE_REFERENCE.format(i + 1) for i in range(num_images))
    return TEMPLATE.format(images=images, prompt=prompt or " ")


def rgba_prompt(prompt: str) -> str:
    """The prompt wrapped so that the model draws a transparent background (decode keeps the alpha channel)."""
    return f"{RGBA_OPENING} {prompt} {RGBA_CLOSING}"


def has_alpha(image) -> bool:
    """Whether an image carries an alpha channel (PIL mode RGBA/LA/PA, or 4 channels in an array/tensor)."""
    if isinstance(image, Image.Image):
        return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    return image.shape[-1] == 4


def to_pil_rgba(image) -> Image.Image:
    """An RGBA PIL image (opaque when the input has no alpha) from PIL, a uint8 array or a [0, 1] tensor/array."""
    if isinstance(image, Image.Image):
        return image.convert("RGBA")
    a = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3 or a.shape[-1] != 4:
        return to_pil(image).convert("RGBA")
    if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(a, "RGBA")


def vl_copy(image) -> Image.Image:
    """What the vision tower sees of a reference: RGB, transparent pixels composited over white (as the
    reference does with PIL's paste, so the rounding is the same)."""
    if not has_alpha(image):
        return to_pil(image)
    rgba = to_pil_rgba(image)
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.getchannel("A"))
    return white


def vision_patches21(image):
    """A reference's patches for the Qwen3-VL tower: ([N, 3*2*16*16] float32, (1, gh, gw))."""
    return vision_patches(
        vl_copy(image), VL_MIN_PIXELS, VL_MAX_PIXELS, PATCH, MERGE, TEMPORAL, mean=VL_MEAN, std=VL_STD
    )


def official_resize(image, resolution: int = 1024) -> Image.Image:
    """The reference's resize of a reference image: about resolution^2 pixels at its aspect ratio, sides rounded
    to multiples of 32, PIL Lanczos, alpha kept (RGBA out)."""
    img = to_pil_rgba(image)
    size = calculate_dimensions(resolution * resolution, img.width / img.height, RESIZE_MULTIPLE)
    return img.resize(size, resample=Image.LANCZOS)


def pad_to_multiple(image, multiple: int = RESIZE_MULTIPLE) -> tuple[Image.Image, tuple[int, int]]:
    """A reference padded, not resampled, to sides that are multiples of `multiple` (edge pixels repeated on the
    right and bottom, so pixel (0, 0) stays put and nothing shifts or zooms), RGBA, and its own (width, height)
    to crop the result back to. The alternative to `official_resize` for edits that must keep their pixels.

    The vision tower's processor scales images under 65536 pixels (256^2) up (its smart resize): for those the
    vision slots no longer cover 2x2 latents each, so a caller that keeps sizes needs references of at least
    that area (the official resize at resolution >= 256 always gives them)."""
    img = to_pil_rgba(image)
    w, h = img.size
    a = np.asarray(img)
    a = np.pad(a, ((0, -h % multiple), (0, -w % multiple), (0, 0)), mode="edge")
    return Image.fromarray(a, "RGBA"), (w, h)
