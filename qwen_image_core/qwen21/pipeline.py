"""Qwen-Image-2.1 generate and edit: from a prompt (and up to 10 reference images) to RGBA pictures.

`QwenImage21Pipeline(dit, vae, encoder)` holds the three 2.1 components (a v1 component is refused, naming
which input it is). `generate` is text-to-image, `edit` conditions on 1 .. 10 references addressed in the
prompt as `<image1>` ... Both run: prompt (+ references) -> Qwen3-VL features -> noise -> sigmas (the base
checkpoint's dynamic shift from the target's token count, or the Turbo list) -> Euler with true CFG, the
prefix K/V caches of the condition and of the negative computed once per run (`sampler.Velocity21`) ->
VAE decode, RGBA.

Numerics follow diffusers' modular `qwenimage21` blocks, with two choices of ours for edits:
* references `resize="pad"` (default): each reference is padded (edge pixels, right/bottom) to sides that
  are multiples of 32, never resampled (`prompts.pad_to_multiple`), so the unedited region keeps its
  pixels; the output is cropped back to image_1's own size. `resize="official"` is the reference's resize
  (about `resolution`^2 pixels, Lanczos); the VL and VAE copies are the same image in both cases, as there.
* the output latent is sized to image_1 (the reference pipeline defaults to the last image's size); an explicit
  width/height overrides it.
Images in are PIL images, uint8 arrays [H, W, C] or float tensors [H, W, C] in [0, 1] (ComfyUI's layout; a
[B, H, W, C] batch is B references), RGB or RGBA (alpha goes through the VAE's fourth channel; the vision tower
sees it composited over white). Images out are float32 [B, 4, H, W] in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .. import sampling
from . import prompts as P
from .dit import DiT21
from .encoder import Qwen3VLEncoder
from .layout import MAX_REFERENCES
from .prompts import RESIZE_MULTIPLE, official_resize, pad_to_multiple, rgba_prompt, to_pil_rgba
from .sampler import Condition21, Velocity21
from .schedule import TURBO_SIGMAS, VAE_SCALE, shifted, sigmas, target_tokens, turbo_sigmas
from .vae import ImageVAE21

# a step callback: (step index, number of steps, current latents, predicted clean latents), as v1's
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
Schedule = str | Sequence[float]  # "dynamic" | "turbo" | explicit base sigmas (shifted as the reference does)
SIZE_MULTIPLE = 2 * VAE_SCALE  # output sides: multiples of 32 pixels (even latent sides), as the reference rounds
RESIZES = ("pad", "official")  # how edit references are brought to multiples of 32 (see the module docstring)


def make_sigmas(schedule: Schedule, steps: int, height: int, width: int) -> torch.Tensor:
    """Sigmas [steps + 1] for a height x width pixel target: "dynamic" (the base checkpoint: shift from the token
    count), "turbo" (the Turbo checkpoint's published 8, `steps` must be 8), or explicit base sigmas."""
    tokens = target_tokens(height, width)
    if isinstance(schedule, str):
        if schedule == "dynamic":
            return sigmas(steps, tokens)
        if schedule == "turbo":
            if steps != len(TURBO_SIGMAS):
                raise ValueError(f"the turbo schedule has {len(TURBO_SIGMAS)} steps, not {steps}")
            return turbo_sigmas()
        raise ValueError(f"unknown schedule {schedule!r}: 'dynamic', 'turbo' or a list of sigmas")
    return shifted(list(schedule), tokens)


def image_tensor(image) -> torch.Tensor:
    """One image as RGBA [1, 4, H, W] float32 in [-1, 1] (opaque alpha when it has none), as the VAE reads it."""
    a = np.asarray(to_pil_rgba(image), dtype=np.float32) / 255.0  # [H, W, 4]
    return torch.from_numpy(a).permute(2, 0, 1)[None] * 2 - 1


@dataclass
class References21:
    """Edit references prepared once: the images both encoders read (sides multiples of 32, RGBA) and the
    (width, height) to crop the output to (image_1's own size with resize "pad", else None)."""

    images: list[Image.Image]
    crop: tuple[int, int] | None


def prepare_references(images, resize: str = "pad", resolution: int = 1024) -> References21:
    """1 .. 10 references as the chosen resize brings them to multiples of 32 (see the module docstring)."""
    refs = list(images.unbind(0) if isinstance(images, torch.Tensor) and images.ndim == 4 else images)
    if not 1 <= len(refs) <= MAX_REFERENCES:
        raise ValueError(
            f"images: Qwen-Image-2.1 edits with 1 to {MAX_REFERENCES} reference images "
            f"(<image1> .. <image{MAX_REFERENCES}>), got {len(refs)}"
        )
    if resize == "pad":
        padded = [pad_to_multiple(r, RESIZE_MULTIPLE) for r in refs]
        out = References21([p for p, _ in padded], padded[0][1])
        how = [f"{w}x{h}, padded to" for _, (w, h) in padded]
        advice = "use resize='official' or a larger image"
    elif resize == "official":
        out = References21([official_resize(r, resolution) for r in refs], None)
        how = [f"{to_pil_rgba(r).width}x{to_pil_rgba(r).height}, resized to" for r in refs]
        advice = "use a larger resolution"
    else:
        raise ValueError(f"unknown resize {resize!r}: one of {', '.join(RESIZES)}")
    for i, (im, said) in enumerate(zip(out.images, how, strict=True)):
        # the vision tower resamples images outside this range: its slots would no longer cover 2x2 latents
        if not P.VL_MIN_PIXELS <= im.width * im.height <= P.VL_MAX_PIXELS:
            raise ValueError(
                f"images[{i}] (image{i + 1}): {said} {im.width}x{im.height}, is outside the {P.VL_MIN_PIXELS} .. "
                f"{P.VL_MAX_PIXELS} pixels the vision tower reads unresampled; {advice}"
            )
    return out


class QwenImage21Pipeline:
    """The 2.1 DiT, VAE and Qwen3-VL encoder, and the jobs that use them. Computes where the DiT's weights are."""

    def __init__(self, dit: DiT21, vae: ImageVAE21, encoder: Qwen3VLEncoder | None = None):
        if not isinstance(dit, DiT21):
            raise TypeError(
                f"dit: {type(dit).__name__} is not a Qwen-Image-2.1 DiT (DiT21, load_dit21); a v1 Qwen-Image DiT "
                "goes with qwen_image_core.pipeline.QwenImagePipeline"
            )
        if not isinstance(vae, ImageVAE21):
            raise TypeError(
                f"vae: {type(vae).__name__} is not the Qwen-Image-2.1 VAE (64 channels, 16x, RGBA: load_vae21); the "
                "v1 16-channel VAE cannot encode or decode 2.1 latents"
            )
        if vae.cfg.z_dim != dit.config.in_channels:
            raise ValueError(f"vae: {vae.cfg.z_dim} latent channels, the DiT reads {dit.config.in_channels}")
        if encoder is not None:
            if not isinstance(encoder, Qwen3VLEncoder):
                raise TypeError(
                    f"encoder: {type(encoder).__name__} is not the Qwen-Image-2.1 condition encoder (Qwen3-VL, "
                    "load_qwen3_vl); v1's Qwen2.5-VL text encoder goes with the v1 pipeline"
                )
            if encoder.model.cfg.hidden_size != dit.config.text_dim:
                raise ValueError(
                    f"encoder: {encoder.model.cfg.hidden_size}-wide features, the DiT reads {dit.config.text_dim}"
                )
        self.dit, self.vae, self.encoder = dit, vae, encoder

    @property
    def device(self) -> torch.device:
        return self.dit.img_in.weight.device

    # -- pieces
    def encode_prompt(self, prompts: Sequence[str], images=(), dtype=torch.float32) -> Condition21:
        """Prompts (+ the references' VL copies) -> the DiT's condition (latents of the references not yet set)."""
        if self.encoder is None:
            raise ValueError("encoder: this pipeline has none; pass conditions to `sample` instead")
        feats, mask, slots = self.encoder.encode(list(prompts), images, dtype=dtype, device=self.device)
        image_slots = slots[0] if bool(slots.any()) else None  # references precede the prompt: same in every row
        return Condition21(feats, image_slots, None, None if bool(mask.all()) else mask)

    def encode_images(self, images: Sequence[Image.Image], dtype=torch.float32) -> list[torch.Tensor]:
        """References -> normalised latents [1, 64, h/16, w/16] each (posterior mode, as the reference)."""
        return [self.vae.encode(image_tensor(im).to(self.device, dtype)).float() for im in images]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> RGBA images [B, 4, H, W] in [0, 1] (float32)."""
        return (self.vae.decode(latents).float() / 2 + 0.5).clamp(0, 1)

    def noise(self, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
        """The reference's initial noise: one CPU generator seeded `seed`, [B, 64, H/16, W/16] float32."""
        shape = (batch, self.dit.config.in_channels, height // VAE_SCALE, width // VAE_SCALE)
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def sample(self, noise: torch.Tensor, sigmas_: torch.Tensor, cond: Condition21,
               negative: Condition21 | None = None, cfg_scale: float = 1.0, dtype=torch.float32,
               callback: StepCallback | None = None, use_cache: bool = True) -> torch.Tensor:  # fmt: skip
        """Euler from `noise` down `sigmas_` (float32 latents, the DiT computing in `dtype`), true CFG when a
        negative is given and cfg_scale != 1; the prefix caches are filled at the first step and reused."""
        velocity = Velocity21(self.dit, cond, negative, cfg_scale if negative is not None else 1.0, use_cache)
        steps = len(sigmas_) - 1

        def v(x, s):
            return velocity(x.to(dtype), s).float()

        def on_step(d):
            if callback is not None:
                callback(d["i"], steps, d["x"], d["denoised"])

        x = noise.to(self.device, torch.float32)
        with torch.no_grad():
            return sampling.sample_euler(sampling.FlowDenoiser(v), x, sigmas_.to(x.device), None, on_step, True)

    def _run(self, prompts, negative_prompt, images, width, height, steps, cfg_scale, seed, noise, schedule,
             callback, dtype, latents) -> torch.Tensor:  # fmt: skip
        width, height = width // SIZE_MULTIPLE * SIZE_MULTIPLE, height // SIZE_MULTIPLE * SIZE_MULTIPLE
        if width < SIZE_MULTIPLE or height < SIZE_MULTIPLE:
            raise ValueError(f"width/height: the output must be at least {SIZE_MULTIPLE} pixels a side")
        sig = make_sigmas(schedule, steps, height, width)  # refuses a bad schedule before any work
        if noise is None:
            noise = self.noise(len(prompts), height, width, seed)
        expected = (self.dit.config.in_channels, height // VAE_SCALE, width // VAE_SCALE)
        if noise.dim() != 4 or tuple(noise.shape[1:]) != expected or noise.shape[0] != len(prompts):
            shape = ", ".join(map(str, (len(prompts), *expected)))
            raise ValueError(f"noise: shape {list(noise.shape)}, expected [{shape}] (one row per prompt and image)")
        cond = self.encode_prompt(prompts, images, dtype)
        cond.ref_latents = latents
        negative = None
        if cfg_scale != 1.0:  # the reference encodes the negative (default "") whenever guidance is on
            neg = negative_prompt if negative_prompt is not None else ""
            neg = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
            if len(neg) != len(prompts):
                raise ValueError(f"negative_prompt: {len(neg)} prompts for {len(prompts)} prompts (or give one)")
            negative = self.encode_prompt(neg, images, dtype)
            negative.ref_latents = latents
        elif negative_prompt:
            raise ValueError("negative_prompt: not used with cfg_scale 1 (no guidance); set cfg_scale > 1 or drop it")
        out = self.sample(noise, sig, cond, negative, cfg_scale, dtype, callback)
        return self.decode(out.to(dtype))

    # -- jobs
    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        width: int = 1024,
        height: int = 1024,
        steps: int = 40,
        cfg_scale: float = 4.0,
        seed: int = 0,
        noise: torch.Tensor | None = None,
        schedule: Schedule = "dynamic",
        batch_size: int = 1,
        rgba: bool = False,
        callback: StepCallback | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Text-to-image -> RGBA [B, 4, height, width] in [0, 1] (sides rounded down to multiples of 32).
        rgba: the prompt wrapped to ask for a transparent background (`prompts.rgba_prompt`)."""
        prompts = _batch(prompt, batch_size)
        if rgba:
            prompts = [rgba_prompt(p) for p in prompts]
        negative = _batch_negative(negative_prompt, batch_size)
        return self._run(prompts, negative, (), width, height, steps, cfg_scale, seed, noise, schedule,
                         callback, dtype, None)  # fmt: skip

    def edit(
        self,
        prompt: str | Sequence[str],
        images,
        negative_prompt: str | Sequence[str] | None = None,
        resize: str = "pad",
        resolution: int = 1024,
        width: int | None = None,
        height: int | None = None,
        steps: int = 40,
        cfg_scale: float = 4.0,
        seed: int = 0,
        noise: torch.Tensor | None = None,
        schedule: Schedule = "dynamic",
        batch_size: int = 1,
        rgba: bool = False,
        callback: StepCallback | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Editing with 1 .. 10 references -> RGBA [B, 4, H, W] in [0, 1].

        resize "pad" (default): references padded to multiples of 32, the output sized to the padded image_1
        and cropped back to image_1's own size (unless width/height are given). "official": the reference's
        resize to about `resolution`^2 pixels; the output is the resized image_1's size unless given."""
        refs = prepare_references(images, resize, resolution)
        prompts = _batch(prompt, batch_size)
        if rgba:
            prompts = [rgba_prompt(p) for p in prompts]
        first = refs.images[0].size
        crop = refs.crop if width is None and height is None else None
        width, height = width or first[0], height or first[1]
        latents = self.encode_images(refs.images, dtype)
        negative = _batch_negative(negative_prompt, batch_size)
        out = self._run(prompts, negative, refs.images, width, height, steps, cfg_scale, seed, noise, schedule,
                        callback, dtype, latents)  # fmt: skip
        return out if crop is None else out[..., : crop[1], : crop[0]]


def _batch(prompt: str | Sequence[str], batch_size: int) -> list[str]:
    """`batch_size` images per prompt, in prompt order (the reference's num_images_per_prompt)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return [p for p in prompts for _ in range(batch_size)]


def _batch_negative(negative: str | Sequence[str] | None, batch_size: int):
    return negative if negative is None or isinstance(negative, str) else _batch(negative, batch_size)
