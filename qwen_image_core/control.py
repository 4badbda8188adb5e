"""ControlNets in sampling: control images to control latents, several ControlNets with strengths and start/end
fractions, their residuals fed to the DiT through its `block_hook`, and ControlNet text-to-image.

Semantics of diffusers' `QwenImageControlNetPipeline` / `QwenImageControlNetInpaintPipeline` (0.42.1):
* a control image is resized (PIL Lanczos) to the output size, scaled to [-1, 1] and VAE-encoded as a posterior
  sample with the run's generator, before the noise is drawn (one image after the other for several);
* the Inpainting ControlNet takes [latent of the image with the masked pixels set to -1 | 1 - mask at latent size
  (nearest)]; the mask is grey-scaled, resized and binarised at 0.5. diffusers draws that latent's posterior sample
  from torch's global generator (it passes none); `control_sample=False` takes the posterior mean instead;
* step i of N runs a ControlNet only when start <= i / N and (i + 1) / N <= end; its residuals, computed with the
  positive prompt, times its strength, serve the positive and the negative pass alike;
* residual `i // ceil(n_dit_blocks / n_net_blocks)` is added after DiT block i, to the target's tokens.
Several ControlNets sum their scaled residuals (diffusers runs one Union net on several images this way; nets of
different depths each keep their own interval here, where diffusers refuses more than one net).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .controlnet import InstantXControlNet
from .prompts import to_pil
from .sizes import DIT_MULTIPLE, LATENT_CHANNELS, VAE_SCALE


@dataclass
class Control:
    """One ControlNet applied in sampling: its control latent, strength and active fraction of the steps."""

    net: InstantXControlNet
    latent: torch.Tensor  # [B|1, 16 (+1 inverted mask), h, w] at the output latent's size
    strength: float = 1.0  # diffusers' controlnet_conditioning_scale
    start: float = 0.0  # first fraction of the steps it acts on (control_guidance_start)
    end: float = 1.0  # last fraction (control_guidance_end)

    def __post_init__(self):
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"ControlNet start {self.start} / end {self.end}: need 0 <= start <= end <= 1")

    def active(self, step: int, steps: int) -> bool:
        return not (step / steps < self.start or (step + 1) / steps > self.end)


@dataclass
class ControlImage:
    """A ControlNet and its control image (and, for the Inpainting ControlNet, the mask: 1 = repaint)."""

    net: InstantXControlNet
    image: object  # PIL image or [B, 3, H, W] / [B, H, W, 3] tensor in [0, 1]
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mask: object = None  # PIL image or [B, 1, H, W] / [B, H, W] tensor in [0, 1]; Inpainting ControlNet only


def pixels(image, width: int, height: int) -> torch.Tensor:
    """A control image at width x height (PIL Lanczos when resized), [B, 3, H, W] float32 in [-1, 1]."""
    batch = list(image.unbind(0)) if isinstance(image, torch.Tensor) and image.ndim == 4 else [image]
    out = []
    for im in batch:
        pil = to_pil(im)
        if pil.size != (width, height):
            pil = pil.resize((width, height), resample=Image.LANCZOS)
        out.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).movedim(-1, 0))
    return torch.stack(out) * 2 - 1


def binary_mask(mask, width: int, height: int) -> torch.Tensor:
    """A repaint mask at width x height, binarised at 0.5: [B, 1, H, W] float32 of 0 / 1 (1 = repaint).

    PIL masks are grey-scaled and resized with Lanczos (diffusers' mask processor); tensors [B, H, W] or
    [B, 1, H, W] must have the size already (ComfyUI's MASK)."""
    if isinstance(mask, Image.Image):
        g = mask.convert("L")
        if g.size != (width, height):
            g = g.resize((width, height), resample=Image.LANCZOS)
        m = torch.from_numpy(np.asarray(g, dtype=np.float32) / 255.0)[None, None]
    else:
        m = torch.as_tensor(mask, dtype=torch.float32)
        m = m[:, None] if m.ndim == 3 else m[None, None] if m.ndim == 2 else m
        if m.ndim != 4 or m.shape[1] != 1:
            raise ValueError(f"mask: expected [B, H, W] or [B, 1, H, W], got {tuple(mask.shape)}")
        if tuple(m.shape[-2:]) != (height, width):
            raise ValueError(f"mask is {m.shape[-1]}x{m.shape[-2]} pixels; the image is {width}x{height}")
    return (m >= 0.5).float()


def control_latent(pipe, spec: ControlImage, width: int, height: int, batch: int, generator, sample=True):
    """The control latent of one ControlImage: [B, 16 (+1), h, w] (see the module docstring)."""
    px = pixels(spec.image, width, height)
    px = px.expand(batch, -1, -1, -1) if px.shape[0] == 1 else px
    if spec.net.extra_channels == 0:
        if spec.mask is not None:
            raise ValueError(f"mask: the {spec.net.kind} ControlNet takes no mask (only the Inpainting one does)")
        return pipe.encode_images(px, sample=sample, generator=generator).float()
    if spec.mask is None:
        raise ValueError("mask: the Inpainting ControlNet needs a mask (1 = repaint)")
    m = binary_mask(spec.mask, width, height)
    if m.shape[0] not in (1, px.shape[0]):
        raise ValueError(f"mask has a batch of {m.shape[0]}; the control image has {px.shape[0]}")
    m = m.expand(px.shape[0], -1, -1, -1)
    masked = torch.where(m > 0.5, torch.full_like(px, -1.0), px)
    z = pipe.encode_images(masked, sample=sample, generator=None).float()  # diffusers passes no generator
    return torch.cat([z, 1 - F.interpolate(m, size=z.shape[-2:], mode="nearest").to(z)], dim=1)


def residual_hook(controls: Sequence[Control], residuals: Sequence[list[torch.Tensor]], n_blocks: int):
    """The DiT block_hook adding the summed scaled residuals after each block to the target's tokens."""
    plans = [(c.strength, r, math.ceil(n_blocks / len(r))) for c, r in zip(controls, residuals, strict=True)]

    def hook(i, run, img, txt, temb, pe):
        img, txt = run(img, txt, temb, pe)
        add = None
        for strength, res, interval in plans:
            r = res[i // interval] * strength
            add = r if add is None else add + r
        if add is None:
            return img, txt
        add = add.repeat(img.shape[0] // add.shape[0], 1, 1).to(img.dtype)  # cond rows serve the uncond rows too
        n = add.shape[1]
        return torch.cat([img[:, :n] + add, img[:, n:]], dim=1), txt

    return hook


class ControlledDenoiser:
    """A CFG denoiser (`sampling.CFGDenoiser`) with ControlNet residuals: each call runs the active ControlNets
    on the positive prompt and passes the DiT a block_hook adding their residuals."""

    def __init__(self, inner, controls: Sequence[Control], sigmas: torch.Tensor, n_blocks: int):
        self.inner, self.controls, self.n_blocks = inner, list(controls), n_blocks
        self.sigmas = sigmas[:-1].double()

    def step_of(self, sigma) -> int:
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        return int((self.sigmas - s).abs().argmin())

    def __call__(self, x, sigma, cond, uncond=None, cond_mask=None, uncond_mask=None, ref_latents=None, **kw):
        step, steps = self.step_of(sigma), len(self.sigmas)
        active = [c for c in self.controls if c.active(step, steps) and c.strength != 0.0]
        if active:
            dt = cond.dtype
            s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
            lengths = [cond.shape[1]] if cond_mask is None else None
            res = [c.net(x.to(dt), s, cond, c.latent.to(x.device), cond_mask, txt_lengths=lengths) for c in active]
            kw["block_hook"] = residual_hook(active, res, self.n_blocks)
        return self.inner(x, sigma, cond, uncond, cond_mask, uncond_mask, ref_latents, **kw)


def generate(
    pipe,
    prompt: str | Sequence[str],
    controls: Sequence[ControlImage],
    negative_prompt: str | Sequence[str] | None = None,
    width: int = 1024,
    height: int = 1024,
    steps: int = 50,
    cfg_scale: float = 4.0,
    seed: int = 0,
    schedule="dynamic",
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    control_sample: bool = True,
    max_sequence_length: int = 512,
) -> torch.Tensor:
    """ControlNet text-to-image with a `pipeline.QwenImagePipeline`: [B, 3, H, W] in [0, 1].

    The control latents are drawn first (union: the run's generator; inpainting: torch's global one, see the
    module docstring; control_sample=False: posterior means), then the noise, as diffusers does."""
    from .pipeline import _batch, make_sigmas  # noqa: PLC0415 (pipeline imports nothing from here)

    if not controls:
        raise ValueError("controls: give at least one ControlImage (or use pipeline.generate)")
    width, height = width // DIT_MULTIPLE * DIT_MULTIPLE, height // DIT_MULTIPLE * DIT_MULTIPLE
    prompts = _batch(prompt, batch_size)
    g = torch.Generator().manual_seed(seed)
    made = [
        Control(c.net, control_latent(pipe, c, width, height, len(prompts), g, control_sample), c.strength,
                c.start, c.end)
        for c in controls
    ]  # fmt: skip
    noise = torch.randn((len(prompts), LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE), generator=g)
    cond, uncond = pipe.encode_t2i(prompts, negative_prompt, cfg_scale, dtype, max_sequence_length)
    sigmas = make_sigmas(schedule, steps, height, width)
    latents = pipe.sample(noise, cond, uncond, sigmas=sigmas, cfg_scale=cfg_scale, controls=made)
    return pipe.decode(latents.to(dtype))


def wrap(denoiser, controls: Sequence[Control], sigmas: torch.Tensor, n_blocks: int):
    """`denoiser` with ControlNet residuals, or `denoiser` itself when there are no controls."""
    return ControlledDenoiser(denoiser, controls, sigmas, n_blocks) if controls else denoiser
