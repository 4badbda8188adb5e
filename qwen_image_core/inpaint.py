"""Inpainting and masked edits: repaint the masked part of an image, keep the rest.

Masks are 1 where the image is repainted, 0 where it is kept (binarised at 0.5). Two latent semantics:
* `masked_euler` (diffusers' `QwenImageInpaintPipeline` / `QwenImageEditInpaintPipeline`): after each Euler step
  the kept latent pixels are replaced by the image's latent noised to the next sigma (the image's latent itself
  after the last step); the latent mask is the pixel mask resized by nearest neighbour;
* `NoiseMaskDenoiser` (ComfyUI's SetLatentNoiseMask, `KSamplerX0Inpaint`): before each model call the kept
  pixels are set to the image's latent noised to the current sigma, and the prediction of x0 there is the
  image's latent; the mask is weighted, not binarised (differential diffusion grades it per step).
A kept pixel is therefore only as exact as the VAE's round trip; `crop_and_stitch` gives the exact pixels back:
it cuts the masked area (with padding) out, lets a job repaint that crop at full resolution and pastes only the
masked pixels back into the untouched original (tolerance 0 on uint8 outside the mask, any size).

Edge cases, by design: an empty mask repaints nothing (the output is the input image's VAE round trip;
`crop_and_stitch` returns the input itself); a full mask is img2img at the given strength. A mask of another
size or batch than the image is a ValueError naming the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import sampling
from .control import binary_mask, pixels
from .prompts import to_pil
from .sizes import DIT_MULTIPLE, LATENT_CHANNELS, VAE_SCALE


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask [B, 1, H, W] at latent size (nearest neighbour, as diffusers' inpaint pipelines)."""
    return F.interpolate(mask, size=size, mode="nearest")


def masked_euler(latent: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor):
    """A k-diffusion sampler (`sampling.sample_euler`'s signature): Euler with diffusers' inpaint blend after
    each step, x = (1 - m) * noised(latent, sigma_next) + m * x. latent, noise [B, 16, h, w]; mask [B|1, 1, h, w]."""

    @torch.no_grad()
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        z, m, n = latent.to(x), mask.to(x), noise.to(x)
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = model(x, sigma * s_in, **extra_args)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
            x = (1 - m) * sampling.noise_latent(z, n, float(sigma_next)) + m * x
        return x

    return sample


class NoiseMaskDenoiser:
    """ComfyUI's latent noise mask around an x0-denoiser: kept pixels (mask 0) enter as the image's latent
    noised to sigma and leave as the image's latent; `mask` [B|1, 1|16, h, w] in [0, 1] may be graded."""

    def __init__(self, inner: Callable, latent: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor):
        self.inner, self.latent, self.mask, self.noise = inner, latent, mask, noise

    def __call__(self, x, sigma, *args, **kwargs):
        m, z = self.mask.to(x), self.latent.to(x)
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        x = x * m + sampling.noise_latent(z, self.noise.to(x), s) * (1 - m)
        return self.inner(x, sigma, *args, **kwargs) * m + z * (1 - m)


def _size(image, width, height) -> tuple[int, int]:
    if width is None or height is None:
        w, h = to_pil(image[0] if isinstance(image, torch.Tensor) and image.ndim == 4 else image).size
        width, height = width or w, height or h
    return width // DIT_MULTIPLE * DIT_MULTIPLE, height // DIT_MULTIPLE * DIT_MULTIPLE


def inpaint(
    pipe,
    prompt: str | Sequence[str],
    image,
    mask,
    negative_prompt: str | Sequence[str] | None = None,
    strength: float = 0.6,
    width: int | None = None,
    height: int | None = None,
    steps: int = 50,
    cfg_scale: float = 4.0,
    seed: int = 0,
    schedule="dynamic",
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    max_sequence_length: int = 512,
    controls: Sequence = (),
) -> torch.Tensor:
    """Text-guided inpainting as diffusers' QwenImageInpaintPipeline: [B, 3, H, W] in [0, 1].

    image / mask: PIL or tensors (see `control.pixels` / `control.binary_mask`), resized to width x height
    (default: the image's size, rounded down to a multiple of 16); strength: the share of the schedule run
    (the first int(steps * (1 - strength)) steps are skipped). The generator draws the image's posterior
    sample, then the noise. controls: `control.Control`s as for `control.generate`.
    """
    from .pipeline import _batch, make_sigmas  # noqa: PLC0415 (pipeline imports nothing from here)

    width, height = _size(image, width, height)
    prompts = _batch(prompt, batch_size)
    px = pixels(image, width, height)
    m = binary_mask(mask, width, height)
    if m.shape[0] not in (1, len(prompts)) or px.shape[0] not in (1, len(prompts)):
        raise ValueError(f"mask has a batch of {m.shape[0]}, the image {px.shape[0]}, for {len(prompts)} prompts")
    g = torch.Generator().manual_seed(seed)
    z = pipe.encode_images(px.expand(len(prompts), -1, -1, -1), dtype, sample=True, generator=g).float()
    sigmas = sampling.sigmas_for_strength(make_sigmas(schedule, steps, height, width), strength)
    if len(sigmas) < 2:
        raise ValueError(f"strength {strength} leaves no step of {steps}: raise strength or steps")
    noise = torch.randn((len(prompts), LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE), generator=g)
    cond, uncond = pipe.encode_t2i(prompts, negative_prompt, cfg_scale, dtype, max_sequence_length)
    sampler = masked_euler(z, latent_mask(m, z.shape[-2:]), noise)
    latents = pipe.sample(
        noise, cond, uncond, sigmas=sigmas, cfg_scale=cfg_scale, latents=z, controls=controls, sampler=sampler
    )
    return pipe.decode(latents.to(dtype))


def edit_inpaint(
    pipe,
    prompt: str,
    image,
    mask,
    negative_prompt: str | None = None,
    strength: float = 0.6,
    steps: int = 50,
    cfg_scale: float = 4.0,
    seed: int = 0,
    schedule="dynamic",
    variant: str = "edit",
    resize: str = "official",
    dtype: torch.dtype = torch.float32,
    zero_cond_t: bool | None = None,
) -> torch.Tensor:
    """Masked instruction editing as diffusers' QwenImageEditInpaintPipeline: [1, 3, H, W] in [0, 1].

    The image is the edit reference and the canvas (resized as `pipeline.prepare_references` does for `variant`
    and `resize`; "edit" / "official" is diffusers' ~1 MP); its posterior sample (the generator's first draw)
    is both the reference latent and the latent kept outside the mask (`masked_euler`). variant "edit_plus"
    (Edit-2509 / 2511, which diffusers has no inpaint pipeline for) uses that model's prompt template.
    """
    from .pipeline import make_sigmas, prepare_references  # noqa: PLC0415

    refs = prepare_references([image], variant, resize)
    width, height = refs.width // DIT_MULTIPLE * DIT_MULTIPLE, refs.height // DIT_MULTIPLE * DIT_MULTIPLE
    m = binary_mask(_image_mask(mask, to_pil(image).size), width, height)
    g = torch.Generator().manual_seed(seed)
    z = pipe.encode_images(refs.vae_pixels[0], dtype, sample=True, generator=g).float()
    sigmas = sampling.sigmas_for_strength(make_sigmas(schedule, steps, height, width), strength)
    if len(sigmas) < 2:
        raise ValueError(f"strength {strength} leaves no step of {steps}: raise strength or steps")
    noise = torch.randn((1, LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE), generator=g)
    template = "edit" if variant == "edit" else "edit_plus"
    cond = pipe.encode_prompt([prompt], template, dtype, None, refs.vl_images)
    cond.ref_latents = [z]
    uncond = None
    if negative_prompt is not None and cfg_scale > 1.0:
        uncond = pipe.encode_prompt([negative_prompt], template, dtype, None, refs.vl_images)
    target = z[..., : height // VAE_SCALE, : width // VAE_SCALE]
    sampler = masked_euler(target, latent_mask(m, target.shape[-2:]), noise)
    latents = pipe.sample(
        noise, cond, uncond, sigmas=sigmas, cfg_scale=cfg_scale, latents=target, sampler=sampler,
        zero_cond_t=zero_cond_t,
    )  # fmt: skip
    return pipe.decode(latents.to(dtype))


def _image_mask(mask, size: tuple[int, int]) -> Image.Image:
    """A mask of the image's own size (width, height) as a grey PIL image (resized with the image later)."""
    m = _mask_array(mask, size)
    return Image.fromarray((np.clip(m, 0, 1) * 255).round().astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------
# Crop to the mask, repaint at full resolution, stitch back
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Crop:
    """A crop box (left, top, right, bottom) in the original's pixels and the size the crop is repainted at."""

    box: tuple[int, int, int, int]
    work_size: tuple[int, int]  # (width, height), multiples of 16


def crop_region(mask: np.ndarray, pad: int = 32, area: int = 1024 * 1024, multiple: int = DIT_MULTIPLE) -> Crop | None:
    """The box around the masked pixels (> 0) grown by `pad` and clipped to the image, and the size to repaint
    it at: scaled to about `area` pixels at the box's aspect, sides multiples of `multiple`. None: empty mask."""
    ys, xs = np.nonzero(mask > 0)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    box = (max(int(xs.min()) - pad, 0), max(int(ys.min()) - pad, 0),
           min(int(xs.max()) + 1 + pad, w), min(int(ys.max()) + 1 + pad, h))  # fmt: skip
    bw, bh = box[2] - box[0], box[3] - box[1]
    scale = (area / (bw * bh)) ** 0.5
    work = (
        max(multiple, round(bw * scale / multiple) * multiple),
        max(multiple, round(bh * scale / multiple) * multiple),
    )
    return Crop(box, work)


def _mask_array(mask, size: tuple[int, int]) -> np.ndarray:
    """A mask as a float array [H, W] in [0, 1] at the image's size (width, height), else ValueError."""
    if isinstance(mask, Image.Image):
        m = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    else:
        m = torch.as_tensor(mask, dtype=torch.float32).squeeze().cpu().numpy()
    if m.ndim != 2:
        raise ValueError(f"mask: one mask [H, W] per image, got shape {tuple(m.shape)}")
    if (m.shape[1], m.shape[0]) != size:
        raise ValueError(f"mask is {m.shape[1]}x{m.shape[0]} pixels; the image is {size[0]}x{size[1]}")
    return m


def stitch(original: torch.Tensor, patch: torch.Tensor, mask: torch.Tensor, box: tuple[int, int, int, int]):
    """Paste `patch` [h, w, C] (the box's size) into a copy of `original` [H, W, C] where `mask` [H, W] > 0,
    blended by the mask's value; pixels where the mask is 0 keep their values exactly (any dtype)."""
    x0, y0, x1, y1 = box
    if tuple(patch.shape[:2]) != (y1 - y0, x1 - x0):
        raise ValueError(f"patch is {patch.shape[1]}x{patch.shape[0]} pixels; the box is {x1 - x0}x{y1 - y0}")
    out = original.clone()
    keep = mask[y0:y1, x0:x1, None].to(torch.float32)
    old = original[y0:y1, x0:x1]
    blended = old.to(torch.float32) * (1 - keep) + patch.to(torch.float32) * keep
    if not original.is_floating_point():
        blended = blended.round().clamp(0, 255)
    out[y0:y1, x0:x1] = torch.where(keep > 0, blended.to(original.dtype), old)
    return out


def crop_and_stitch(image, mask, job: Callable[[Image.Image, Image.Image], Image.Image], pad: int = 32,
                    area: int = 1024 * 1024) -> Image.Image:  # fmt: skip
    """Repaint only the masked part of `image` with `job(crop, crop_mask) -> repainted crop` at full resolution.

    The masked box (plus `pad`) is cut out and resized to about `area` pixels (sides multiples of 16), the job
    repaints it, the result is resized back to the box, and only pixels where the mask is set are pasted into a
    copy of the original (soft masks blend, a pixel with mask 0 keeps its bytes exactly). Any image size.
    An empty mask returns the image unchanged without running the job.
    """
    src = to_pil(image).convert("RGB")
    m = _mask_array(mask, src.size)
    region = crop_region(m, pad, area)
    if region is None:
        return src.copy()
    crop = src.crop(region.box).resize(region.work_size, Image.LANCZOS)
    crop_mask = Image.fromarray((m * 255).round().astype(np.uint8)).crop(region.box).resize(region.work_size)
    out = to_pil(job(crop, crop_mask)).convert("RGB")
    box_w, box_h = region.box[2] - region.box[0], region.box[3] - region.box[1]
    back = torch.from_numpy(np.asarray(out.resize((box_w, box_h), Image.LANCZOS)).copy())
    result = stitch(torch.from_numpy(np.asarray(src).copy()), back, torch.from_numpy(m), region.box)
    return Image.fromarray(result.numpy())
