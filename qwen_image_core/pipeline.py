"""Generate and edit: from prompts (and reference images) to pictures, the way the official pipelines do.

`QwenImagePipeline(dit, vae, text_encoder)` holds the three components; `generate` is text-to-image and
img2img (`image=`, `strength=`), `edit` is Qwen-Image-Edit (`variant="edit"`, one image) and Edit-2509/2511
(`variant="edit_plus"`, several images; 2511's `zero_cond_t` comes from the checkpoint). Both end in
`sample`, which the ComfyUI sampler node calls directly with conditioning tensors: noise -> sigma
schedule -> Euler on the flow model with true CFG (cond and uncond in one batched pass) -> latents.

Images in and out are float tensors [B, 3, H, W] in [0, 1] or PIL images (in). Numerics follow diffusers'
`QwenImage*Pipeline`s; see `sampling.py` for the schedules and guidance.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import modulation, sampling
from .formats.vae import load_vae
from .lora import Lora, loras_applied
from .mmdit import MMDiT, load_dit
from .ops import lora_to
from .prompts import EditResize, calculate_dimensions, resize_for_edit, to_pil
from .sizes import DIT_MULTIPLE, LATENT_CHANNELS, VAE_SCALE
from .text_encoder import TextEncoder, load_text_encoder
from .vae import ImageVAE

# a step callback: (step index, number of steps, current latents, predicted clean latents)
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
Schedule = str | float | Sequence[float]  # "dynamic" | "lightning" | a fixed shift | explicit sigmas
EDIT_AREA = 1024 * 1024  # the official pipelines' output and VAE-copy area for edits
# (variant, resize) -> how references are resized (prompts.EDIT_RESIZE names or an EditResize)
RESIZE_POLICIES = {
    ("edit", "official"): "edit",
    ("edit_plus", "official"): "edit_plus",
    ("edit_plus", "keep"): "keep",
    # Qwen-Image-Edit saw ~1 MP VL images: keep that for the vision tower, keep the pixels for the VAE
    ("edit", "keep"): EditResize(vl_area=EDIT_AREA, vae_area=None, multiple=DIT_MULTIPLE, max_area=2048 * 2048),
}


def make_sigmas(schedule: Schedule, steps: int, height: int, width: int, denoise: float = 1.0) -> torch.Tensor:
    """Sigmas [steps + 1] for an image of height x width pixels.

    "dynamic": diffusers' resolution-dependent shift with terminal 0.02 (the official default);
    "lightning": plain shift 3 (the Lightning LoRAs' schedule); a number: ComfyUI's ModelSamplingAuraFlow
    shift with the "simple" scheduler (the official ComfyUI workflows use 3.1); a list: explicit sigmas.
    denoise < 1 (ComfyUI's meaning): the last `steps` steps of a schedule of int(steps / denoise) steps.
    """
    if denoise < 1.0 and not isinstance(schedule, (list, tuple)):
        return sampling.sigmas_for_denoise(lambda n: make_sigmas(schedule, n, height, width), steps, denoise)
    if isinstance(schedule, str):
        if schedule == "dynamic":
            seq = sampling.image_seq_len(height // VAE_SCALE, width // VAE_SCALE)
            return sampling.sigmas_diffusers(steps, seq)
        if schedule == "lightning":
            return sampling.sigmas_lightning(steps)
        raise ValueError(f"unknown schedule {schedule!r}: use 'dynamic', 'lightning', a shift value or a sigma list")
    if isinstance(schedule, (int, float)):
        return sampling.sigmas_comfy(steps, shift=float(schedule))
    return sampling.sigmas_from_list(schedule)


def _images_to_tensor(images, width: int | None = None, height: int | None = None) -> torch.Tensor:
    """PIL images or [B, 3, H, W] / [B, H, W, 3] tensors in [0, 1] -> [B, 3, H, W] float32 in [-1, 1],
    resized (PIL Lanczos, as diffusers' VaeImageProcessor) when a size is given."""
    if isinstance(images, torch.Tensor) and width is None:
        x = images if images.shape[1] in (3, 4) else images.movedim(-1, 1)
        return x.float() * 2 - 1
    if isinstance(images, torch.Tensor):
        batch = list(images.unbind(0))
    else:
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
    out = []
    for im in batch:
        pil = to_pil(im)
        if width is not None and pil.size != (width, height):
            pil = pil.resize((width, height), resample=Image.LANCZOS)
        out.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).movedim(-1, 0))
    return torch.stack(out) * 2 - 1


@dataclass
class EditReferences:
    """Edit references prepared for the two encoders, and the default output size (width, height)."""

    vl_images: list[Image.Image]  # copies for the vision tower
    vae_pixels: list[torch.Tensor]  # copies for the VAE, each [1, 3, h, w] in [-1, 1]
    width: int
    height: int


def prepare_references(
    images, variant: str = "edit_plus", resize: str = "official", canvas: str = "last"
) -> EditReferences:
    """Resize edit references as the chosen variant and resize policy do (see `RESIZE_POLICIES`).

    Default output size: "official" is about 1 MP (sides multiples of 32) at the aspect ratio of the `canvas`
    reference: "last" is diffusers' QwenImageEditPlusPipeline, "first" (Picture 1) is what the official ComfyUI
    workflows do. "keep" is the first reference's own size (cropped to a multiple of 16) either way.
    """
    if canvas not in ("first", "last"):
        raise ValueError(f"unknown canvas {canvas!r}: 'first' (Picture 1) or 'last' (diffusers)")
    refs = list(images) if isinstance(images, (list, tuple)) else [images]
    if not refs:
        raise ValueError("editing needs at least one reference image")
    if variant == "edit" and len(refs) != 1:
        raise ValueError(f"Qwen-Image-Edit takes exactly one image, got {len(refs)}: use variant 'edit_plus'")
    policy = RESIZE_POLICIES.get((variant, resize))
    if policy is None:
        raise ValueError(f"unknown variant/resize {variant!r}/{resize!r}: 'edit'|'edit_plus' and 'official'|'keep'")
    copies = [resize_for_edit(r, policy) for r in refs]
    if resize == "keep":
        width, height = copies[0][1].size
    else:
        ref = to_pil(refs[0] if canvas == "first" else refs[-1])
        width, height = calculate_dimensions(EDIT_AREA, ref.width / ref.height, 32)
    return EditReferences([c[0] for c in copies], [_images_to_tensor([c[1]]) for c in copies], width, height)


@dataclass
class Conditioning:
    """Encoded prompt(s): embeddings [B, T, 3584], key mask [B, T], and edit reference latents."""

    embeds: torch.Tensor
    mask: torch.Tensor | None = None
    ref_latents: list[torch.Tensor] | None = None


class QwenImagePipeline:
    """The three components and the jobs that use them. Computes where the DiT's weights are."""

    def __init__(self, dit: MMDiT, vae: ImageVAE, text_encoder: TextEncoder | None = None):
        if not isinstance(dit, MMDiT):
            raise TypeError(
                f"dit: {type(dit).__name__} is not a Qwen-Image (v1) MMDiT (load_dit); a Qwen-Image-2.1 "
                "DiT goes with qwen_image_core.qwen21.QwenImage21Pipeline"
            )
        if vae.cfg.z_dim * dit.config.patch_size**2 != dit.config.in_channels:
            raise ValueError(
                f"vae: {vae.cfg.z_dim} latent channels, the DiT reads {dit.config.out_channels} (a "
                "Qwen-Image-2.1 VAE does not fit the v1 DiT: use the 16-channel Qwen-Image VAE)"
            )
        if text_encoder is not None and not isinstance(text_encoder, TextEncoder):
            raise TypeError(
                f"text_encoder: {type(text_encoder).__name__} is not the Qwen2.5-VL text encoder "
                "(load_text_encoder); Qwen-Image-2.1's Qwen3-VL encoder goes with its own pipeline"
            )
        self.dit, self.vae, self.text_encoder = dit, vae, text_encoder

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, tokenizer=None) -> QwenImagePipeline:
        """Load a diffusers repo folder of Qwen/Qwen-Image* (transformer/, vae/, text_encoder/, tokenizer/)."""
        folder = Path(folder)
        te = load_text_encoder(folder / "text_encoder", tokenizer=tokenizer or folder / "tokenizer")
        return cls(load_dit(folder / "transformer"), load_vae(folder / "vae"), te)

    @property
    def device(self) -> torch.device:
        return self.dit.img_in.weight.device

    # -- pieces
    def encode_prompt(
        self, prompts: Sequence[str], template: str = "t2i", dtype=torch.float32, max_len=None, images=None
    ) -> Conditioning:
        """Prompts (+ VL copies of edit images) -> Conditioning; the mask is None when nothing is padded."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder: pass conditioning tensors to sample() instead")
        embeds, mask = self.text_encoder.encode(
            list(prompts), images, template, max_sequence_length=max_len, dtype=dtype, device=self.device
        )
        return Conditioning(embeds, None if bool(mask.all()) else mask)

    def encode_t2i(self, prompts: Sequence[str], negative_prompt, cfg_scale: float, dtype, max_len):
        """(cond, uncond) of text-to-image prompts; uncond (the negative, one for all or one per prompt) only when
        guidance runs: a negative given and cfg_scale > 1, else None."""
        cond = self.encode_prompt(prompts, "t2i", dtype, max_len)
        uncond = None
        if negative_prompt is not None and cfg_scale > 1.0:
            uncond = self.encode_prompt(_batch(negative_prompt, len(prompts)), "t2i", dtype, max_len)
        return cond, uncond

    def encode_images(self, images, dtype=torch.float32, sample: bool = False, generator=None) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> normalised latents."""
        return self.vae.encode(images.to(device=self.device, dtype=dtype), sample=sample, generator=generator)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images [B, 3, H, W] in [0, 1] (float32)."""
        return (self.vae.decode(latents).float() / 2 + 0.5).clamp(0, 1)

    def sample(self, noise: torch.Tensor, cond: Conditioning, uncond: Conditioning | None = None, **kwargs):
        """`sample` (the module function) with this pipeline's DiT."""
        return sample(self.dit, noise, cond, uncond, **kwargs)

    # -- jobs
    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        width: int = 1024,
        height: int = 1024,
        steps: int = 50,
        cfg_scale: float = 4.0,
        seed: int = 0,
        noise: torch.Tensor | None = None,
        schedule: Schedule = "dynamic",
        image=None,
        strength: float = 0.6,
        batch_size: int = 1,
        callback: StepCallback | None = None,
        loras: Sequence[tuple[Lora, float]] = (),
        dtype: torch.dtype = torch.float32,
        max_sequence_length: int = 512,
    ) -> torch.Tensor:
        """Text-to-image, or img2img when `image` is given: `strength` is the share of the schedule run (diffusers'
        img2img semantics: the first int(steps * (1 - strength)) steps are skipped). -> [B, 3, H, W] in [0, 1]."""
        width, height = width // DIT_MULTIPLE * DIT_MULTIPLE, height // DIT_MULTIPLE * DIT_MULTIPLE
        prompts = _batch(prompt, batch_size)
        g = torch.Generator().manual_seed(seed)
        start = None
        sigmas = make_sigmas(schedule, steps, height, width)
        if image is not None:  # diffusers' img2img: sample the posterior first (it consumes the generator)
            pixels = _images_to_tensor(image, width, height).expand(len(prompts), -1, -1, -1)
            start = self.encode_images(pixels, dtype, sample=True, generator=g).float()
            sigmas = sampling.sigmas_for_strength(sigmas, strength)
        if noise is None:
            shape = (len(prompts), LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE)
            noise = torch.randn(shape, generator=g)
        cond, uncond = self.encode_t2i(prompts, negative_prompt, cfg_scale, dtype, max_sequence_length)
        latents = self.sample(
            noise, cond, uncond, sigmas=sigmas, cfg_scale=cfg_scale, latents=start, callback=callback, loras=loras
        )
        return self.decode(latents.to(dtype))

    def edit(
        self,
        prompt: str,
        images,
        negative_prompt: str | None = None,
        variant: str = "edit_plus",
        resize: str = "official",
        width: int | None = None,
        height: int | None = None,
        steps: int = 50,
        cfg_scale: float = 4.0,
        seed: int = 0,
        noise: torch.Tensor | None = None,
        schedule: Schedule = "dynamic",
        batch_size: int = 1,
        callback: StepCallback | None = None,
        loras: Sequence[tuple[Lora, float]] = (),
        dtype: torch.dtype = torch.float32,
        zero_cond_t: bool | None = None,
    ) -> torch.Tensor:
        """Instruction editing with one (variant "edit") or several ("edit_plus") reference images.

        resize "official": references resized as the official pipeline does (~1 MP VAE copies; output size
        from the reference, the last one for edit_plus). resize "keep": each reference keeps its own pixels
        (cropped at the right/bottom to a multiple of 16) and the canvas is the first reference's, which
        avoids the shift/zoom of outputs that the forced ~1 MP resize causes.
        """
        refs = prepare_references(images, variant, resize)
        width, height = width or refs.width, height or refs.height
        width, height = width // DIT_MULTIPLE * DIT_MULTIPLE, height // DIT_MULTIPLE * DIT_MULTIPLE
        ref_latents = [self.encode_images(px, dtype).float() for px in refs.vae_pixels]
        g = torch.Generator().manual_seed(seed)
        if noise is None:
            noise = torch.randn((batch_size, LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE), generator=g)
        template = "edit" if variant == "edit" else "edit_plus"
        cond = self.encode_prompt([prompt] * noise.shape[0], template, dtype, None, refs.vl_images)
        cond.ref_latents = ref_latents
        uncond = None
        if negative_prompt is not None and cfg_scale > 1.0:
            uncond = self.encode_prompt([negative_prompt] * noise.shape[0], template, dtype, None, refs.vl_images)
        sigmas = make_sigmas(schedule, steps, height, width)
        latents = self.sample(
            noise,
            cond,
            uncond,
            sigmas=sigmas,
            cfg_scale=cfg_scale,
            callback=callback,
            loras=loras,
            zero_cond_t=zero_cond_t,
        )
        return self.decode(latents.to(dtype))


def sample(
    dit: MMDiT,
    noise: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    sigmas: torch.Tensor | None = None,
    cfg_scale: float = 4.0,
    cfg_rescale: str | None = "norm",
    latents: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    loras: Sequence[tuple[Lora, float]] = (),
    zero_cond_t: bool | None = None,
    controls: Sequence = (),
    precompute_modulation: bool = True,
    sampler: Callable | None = None,
    forward: Callable | None = None,
) -> torch.Tensor:
    """Flow-matching Euler sampling from `noise` [B, 16, h, w] down `sigmas`; returns clean latents (float32).

    Computes on the DiT's device in the conditioning's dtype. latents: the image to start from (img2img,
    denoise < 1): x = sigma_0 * noise + (1 - sigma_0) * latents. CFG runs when cfg_scale > 1 and `uncond`
    is given, cond and uncond in one batched pass. Conditioning of batch 1 serves every sample.
    controls: ControlNets (`control.Control`) whose residuals enter the DiT's blocks.
    precompute_modulation: the AdaLN modulation of every step computed once at the start (`modulation.py`: its
    weights read once per run, the same numbers); the step index selects the entry on the host.
    sampler: a k-diffusion sampler in place of Euler that calls back once per step (`inpaint.masked_euler`).
    forward: called in place of `dit(...)` with its arguments (`parallel.SequenceParallel`: tokens split over ranks).
    """
    device = dit.img_in.weight.device
    dtype = cond.embeds.dtype
    x = noise.to(device=device, dtype=torch.float32)
    if latents is not None:
        x = sampling.noise_latent(latents.to(x), x, float(sigmas[0]))
    use_cfg = uncond is not None and cfg_scale > 1.0
    table = []  # the run's modulation.ModulationTable, made once the LoRAs apply; `at` follows the steps
    velocity = _velocity(forward or dit, dtype, zero_cond_t, lambda: table[0].current() if table else None)
    denoiser = sampling.CFGDenoiser(velocity, cfg_scale if use_cfg else 1.0, cfg_rescale)
    if controls:
        from .control import wrap  # noqa: PLC0415 (control imports this module lazily)

        denoiser = wrap(denoiser, controls, sigmas, len(dit.transformer_blocks))
    extra = _batched(cond, x.shape[0], device, dtype, "")
    if use_cfg:
        extra.update(_batched(uncond, x.shape[0], device, dtype, "un"))
    steps = len(sigmas) - 1

    def on_step(d):
        if table:
            table[0].at = d["i"] + 1
        if callback is not None:
            callback(d["i"], steps, d["x"], d["denoised"])

    with loras_applied(dit, loras):
        lora_to(dit, device, dtype)  # the factors where and as the layers compute, once for the run
        if precompute_modulation and not modulation.supported(dit):
            zero = (dit.zero_cond_t if zero_cond_t is None else zero_cond_t) and bool(cond.ref_latents)
            rows = x.shape[0] * (2 if use_cfg else 1)
            table.append(modulation.precompute(dit, sigmas[:-1], rows, dtype, device, zero))
        return (sampler or sampling.sample_euler)(denoiser, x, sigmas, extra, on_step, disable=True)


def _batched(c: Conditioning, batch: int, device, dtype, prefix: str) -> dict:
    """Conditioning tensors on the device, with batch-1 conditioning repeated for every sample."""

    def rep(t):
        t = t.to(device)
        return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 and batch > 1 else t

    out = {f"{prefix}cond": rep(c.embeds.to(dtype)), f"{prefix}cond_mask": None if c.mask is None else rep(c.mask)}
    if not prefix:
        out["ref_latents"] = None if not c.ref_latents else [rep(r.float()) for r in c.ref_latents]
    return out


def _velocity(dit: Callable, dtype: torch.dtype, zero_cond_t: bool | None, step_mod: Callable = lambda: None):
    """The DiT as a velocity model on float32 latents, computing in `dtype`; step_mod() gives the call's
    precomputed modulation (`modulation.StepModulation`) or None."""

    def velocity(x, sigma, txt, txt_mask=None, ref_latents=None, txt_lengths=None, block_hook=None):
        refs = None if ref_latents is None else [r.to(dtype) for r in ref_latents]
        out = dit(
            x.to(dtype), sigma, txt, txt_mask, ref_latents=refs, zero_cond_t=zero_cond_t, txt_lengths=txt_lengths,
            block_hook=block_hook, step_mod=step_mod(),
        )  # fmt: skip
        return out.float()

    return velocity


def load_pipeline(folder: str | os.PathLike, tokenizer=None) -> QwenImagePipeline:
    """A pipeline from a diffusers repo folder of Qwen/Qwen-Image* (transformer/, vae/, text_encoder/, tokenizer/)."""
    return QwenImagePipeline.from_folder(folder, tokenizer)


def _batch(prompt: str | Sequence[str], batch_size: int) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return prompts * batch_size if len(prompts) == 1 else prompts
