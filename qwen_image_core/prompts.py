"""Everything between a prompt (plus edit images) and the encoder's inputs.

* the three chat templates of the Qwen-Image family and how many leading tokens each drops,
* finding and loading the Qwen2.5 tokenizer (no ComfyUI import: its folder is searched for),
* image preprocessing for the vision tower without torchvision (smart resize, bicubic, CLIP
  normalisation, 14-px patches with the frame duplicated to the temporal patch of 2),
* the edit pipelines' image resizes as named policies, including one that keeps the reference's size,
* the 3D (temporal, height, width) M-RoPE positions of a token sequence, as transformers' get_rope_index.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# special token ids of the Qwen2.5 tokenizer
PAD = 151643  # <|endoftext|>
IM_START = 151644  # <|im_start|>
IM_END = 151645  # <|im_end|>
VISION_START = 151652  # <|vision_start|>
VISION_END = 151653  # <|vision_end|>
IMAGE_PAD = 151655  # <|image_pad|>, repeated once per merged image token

_EDIT_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True)
class Template:
    text: str  # the chat text with one `{}` for the user turn
    drop: int  # leading tokens dropped from the encoder output (system block + "<|im_start|>user\n")
    images: str  # "none", "one" (one image slot inside the template), or "pictures" ("Picture N: " per image)
    max_tokens: int | None  # reference limit on kept tokens (diffusers' tokenizer max_length - drop); None = none


TEMPLATES = {
    # QwenImagePipeline (Qwen-Image, -2512; also img2img / inpaint / controlnet / layered)
    "t2i": Template(
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
        "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}" + _SUFFIX,
        drop=34,
        images="none",
        max_tokens=1024,
    ),
    # QwenImageEditPipeline (Qwen-Image-Edit): the image sits at the start of the user turn
    "edit": Template(_EDIT_SYSTEM + IMAGE_SLOT + "{}" + _SUFFIX, drop=64, images="one", max_tokens=None),
    # QwenImageEditPlusPipeline (Edit-2509, -2511): "Picture 1: <image>Picture 2: <image>...<prompt>"
    "edit_plus": Template(_EDIT_SYSTEM + "{}" + _SUFFIX, drop=64, images="pictures", max_tokens=None),
}
PICTURE = "Picture {}: " + IMAGE_SLOT
# diffusers' QwenImagePipeline default max_sequence_length (it refuses more than 1024)
T2I_DEFAULT_MAX_TOKENS = 512


def template_text(template: str, prompt: str, num_images: int) -> str:
    """The chat text for one prompt; raises ValueError when the image count does not fit the template."""
    t = TEMPLATES[template]
    if t.images == "none" and num_images:
        raise ValueError(f"template {template!r} takes no images, got {num_images}")
    if t.images == "one" and num_images != 1:
        raise ValueError(f"template {template!r} takes exactly one image, got {num_images}; use 'edit_plus'")
    if t.images == "pictures":
        prompt = "".join(PICTURE.format(i + 1) for i in range(num_images)) + prompt
    return t.text.format(prompt)


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------

TOKENIZER_MARKERS = ("tokenizer.json", "vocab.json")
# where the tokenizer sits relative to a folder we are given: itself, a diffusers repo or its text_encoder/
# folder, ComfyUI's root folder, its `comfy` package folder, or ComfyUI's models/text_encoders/ folder
TOKENIZER_RELATIVE = (
    ".",
    "tokenizer",
    "../tokenizer",
    "processor",
    "comfy/text_encoders/qwen25_tokenizer",
    "text_encoders/qwen25_tokenizer",
    "../../comfy/text_encoders/qwen25_tokenizer",  # from ComfyUI/models/text_encoders/
)


def find_tokenizer(path: str | os.PathLike | None = None, search: Sequence[str | os.PathLike] = ()) -> Path:
    """The folder of the Qwen2.5 tokenizer.

    An explicit `path` is the only place tried (with the relative locations above). Without one: each
    folder in `search`, then the folder of an importable `comfy` package (located without importing it).
    Raises FileNotFoundError listing the places looked at.
    """
    roots = [Path(path)] if path is not None else [Path(p) for p in search]
    roots = [r.parent if r.is_file() else r for r in roots]
    if path is None:
        try:  # ComfyUI's package when running inside ComfyUI
            spec = importlib.util.find_spec("comfy")
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            roots += [Path(p) for p in spec.submodule_search_locations]
    looked = []
    for root in roots:
        for rel in TOKENIZER_RELATIVE:
            d = (root / rel).resolve()
            looked.append(str(d))
            if any((d / m).is_file() for m in TOKENIZER_MARKERS):
                return d
    raise FileNotFoundError(
        "no Qwen2.5 tokenizer found (vocab.json + merges.txt or tokenizer.json); pass its folder explicitly, "
        "e.g. a diffusers Qwen-Image repo's tokenizer/ or ComfyUI's comfy/text_encoders/qwen25_tokenizer/. "
        "Looked in: " + ", ".join(dict.fromkeys(looked))
    )


def load_tokenizer(folder: str | os.PathLike):
    """transformers' Qwen2 tokenizer from a folder, with a check that the special tokens sit at their ids."""
    from transformers import Qwen2Tokenizer  # noqa: PLC0415 (heavy import, only when a tokenizer is needed)

    tok = Qwen2Tokenizer.from_pretrained(str(folder))
    ids = tok.convert_tokens_to_ids(["<|im_start|>", "<|vision_start|>", "<|image_pad|>"])
    if ids != [IM_START, VISION_START, IMAGE_PAD]:
        raise ValueError(f"{folder}: not the Qwen2.5 tokenizer (special tokens at {ids})")
    return tok


# ---------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 56 * 56  # processor/preprocessor_config.json of the Qwen-Image-Edit repos
MAX_PIXELS = 12845056


def to_pil(image) -> Image.Image:
    """An RGB PIL image from PIL, a uint8 array [H, W, C], or a float tensor/array in [0, 1] ([1,] H, W, C)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"expected an image [H, W, C], got shape {a.shape}")
    if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(a[..., :3] if a.shape[-1] >= 3 else a[..., 0]).convert("RGB")


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS):
    """Qwen2-VL's size rule: sides rounded to multiples of `factor`, area rescaled into [min, max] pixels."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def vision_patches(
    image,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    patch: int = 14,
    merge: int = 2,
    temporal: int = 2,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
):
    """Pixels of one image as the vision tower's patches: ([N, 3*temporal*patch*patch] float32, (1, gh, gw)).

    Smart resize (bicubic, on 8-bit RGB, as transformers' PIL image processor), x/255, `mean`/`std` (CLIP's
    for Qwen2.5-VL), then `patch`-px patches grouped by 2x2 merge block, each frame repeated `temporal` times.
    """
    img = to_pil(image)
    h, w = smart_resize(img.height, img.width, patch * merge, min_pixels, max_pixels)
    img = img.resize((w, h), resample=Image.BICUBIC)
    x = torch.from_numpy((np.asarray(img, dtype=np.float64) * (1 / 255)).astype(np.float32)).permute(2, 0, 1)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]  # [3, H, W]
    gh, gw = h // patch, w // patch
    x = x.view(3, gh // merge, merge, patch, gw // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
    x = x[:, :, :, :, :, None].expand(*x.shape[:5], temporal, patch, patch)  # [gh/m, gw/m, m, m, 3, T, p, p]
    return x.reshape(gh * gw, -1).contiguous(), (1, gh, gw)


def calculate_dimensions(area: int, ratio: float, multiple: int = 32) -> tuple[int, int]:
    """(width, height) of about `area` pixels at `ratio` = w/h, sides rounded (half to even) to `multiple`."""
    width = math.sqrt(area * ratio)
    return round(width / multiple) * multiple, round(width / ratio / multiple) * multiple


@dataclass(frozen=True)
class EditResize:
    """How an edit reference is resized for the vision tower (VL copy) and for the VAE (VAE copy)."""

    vl_area: int | None  # target area of the VL copy; None: the VL copy is the VAE copy
    vae_area: int | None  # target area of the VAE copy; None: keep the image's own size (cropped, see below)
    multiple: int = 32  # VAE-copy sides are multiples of this
    max_area: int | None = None  # "keep" only: scale down larger images to this area first


EDIT_RESIZE = {
    # QwenImageEditPipeline: one copy at ~1024^2 (sides multiples of 32) for both the VL encoder and the VAE
    "edit": EditResize(vl_area=None, vae_area=1024 * 1024),
    # QwenImageEditPlusPipeline: VL copy at ~384^2, VAE copy at ~1024^2, both multiples of 32
    "edit_plus": EditResize(vl_area=384 * 384, vae_area=1024 * 1024),
    # the reference keeps its own pixels: the VAE copy is only cropped at the right/bottom to a multiple of
    # 16 (no resampling, so nothing shifts or zooms); the VL copy is the usual ~384^2 one
    "keep": EditResize(vl_area=384 * 384, vae_area=None, multiple=16, max_area=2048 * 2048),
}


def resize_for_edit(image, policy: str | EditResize = "edit_plus") -> tuple[Image.Image, Image.Image]:
    """(VL copy, VAE copy) of an edit reference under a resize policy (a name in EDIT_RESIZE or an EditResize).

    The resizes use PIL Lanczos, as diffusers' VaeImageProcessor.resize does.
    """
    p = EDIT_RESIZE[policy] if isinstance(policy, str) else policy
    img = to_pil(image)
    ratio = img.width / img.height
    if p.vae_area is not None:
        vae = img.resize(calculate_dimensions(p.vae_area, ratio, p.multiple), resample=Image.LANCZOS)
    else:
        if p.max_area is not None and img.width * img.height > p.max_area:
            s = math.sqrt(p.max_area / (img.width * img.height))
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), resample=Image.LANCZOS)
        w, h = (
            max(p.multiple, img.width // p.multiple * p.multiple),
            max(p.multiple, img.height // p.multiple * p.multiple),
        )
        vae = img.crop((0, 0, w, h))
    if p.vl_area is None:
        return vae, vae
    return img.resize(calculate_dimensions(p.vl_area, ratio, 32), resample=Image.LANCZOS), vae


# ---------------------------------------------------------------------------------------------------
# Multimodal RoPE positions
# ---------------------------------------------------------------------------------------------------


def rope_index(input_ids: torch.Tensor, grids: Sequence[tuple[int, int, int]], merge: int = 2) -> torch.Tensor:
    """(temporal, height, width) positions [3, B, L] of right-padded token rows, as get_rope_index.

    Text tokens count up on all three axes. The k-th run of `<|image_pad|>` tokens in a row is image
    `grids[k]` (the same images in every row): its merged tokens, row-major, get (s, s + row, s + col) for
    the current counter s, and the counter then advances by max(rows, cols). Padding continues counting.
    """
    b, n = input_ids.shape
    out = torch.empty(3, b, n, dtype=torch.long)
    ids = input_ids.tolist()
    for r in range(b):
        cur, i, k = 0, 0, 0
        while i < n:
            if ids[r][i] != IMAGE_PAD:
                out[:, r, i] = cur
                cur, i = cur + 1, i + 1
                continue
            if k >= len(grids):
                raise ValueError(f"row {r} has more image token runs than the {len(grids)} images given")
            t, gh, gw = grids[k]
            mh, mw = gh // merge, gw // merge
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(mh), torch.arange(mw), indexing="ij")
            count = t * mh * mw
            out[:, r, i : i + count] = torch.stack([tt, hh, ww]).reshape(3, -1) + cur
            cur, i, k = cur + max(mh, mw), i + count, k + 1
    return out.to(input_ids.device)
