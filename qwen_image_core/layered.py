"""Qwen-Image-Layered: decompose a picture into N transparent RGBA layers (plus the composite it sees).

The model (a Qwen-Image DiT with the layer-3D RoPE and the additional timestep condition, see `rope` and
`layer_tokens`) denoises a layered latent [B, 16, N + 1, h, w]: frame 0 is the composite, frames 1..N the
layers, each an RGBA image of the RGBA VAE (`VAEConfig(image_channels=4)`). The input picture is encoded
by the same VAE and attends as one reference at RoPE frame -1.

Numerics follow diffusers' `QwenImageLayeredPipeline` (0.42.1):
* resize: the picture is resized (PIL Lanczos on RGBA, i.e. premultiplied alpha) to about
  `resolution`^2 pixels at its aspect ratio, sides multiples of 32; the layers have that size;
* prompt: the text-to-image template ("Describe the image by ...", 34 tokens dropped). The reference
  captions an empty prompt with Qwen2.5-VL (`use_en_prompt` picks English or Chinese captions); this
  pipeline has no captioner: an empty prompt is refused (write the caption yourself, in either language);
* schedule: linspace(1, 1/N, N) shifted by e^mu with mu = sqrt(input tokens / 256), terminal 0.02 (the
  Qwen-Image scheduler config), Euler;
* guidance: true CFG with a negative prompt when cfg_scale > 1; `cfg_normalize` rescales each token of the
  guided velocity to the norm of the conditional one;
* noise drawn as [B, N + 1, 16, h, w] (the reference's order) from `seed`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import sampling
from .mmdit import MMDiT
from .prompts import calculate_dimensions
from .sizes import LATENT_CHANNELS, VAE_SCALE
from .text_encoder import TextEncoder
from .vae import ImageVAE

RESOLUTIONS = (640, 1024)  # the reference's buckets: about 640^2 (the recommended one) or 1024^2 pixels
SIZE_MULTIPLE = 32  # the resized picture's sides (calculate_dimensions in the reference)
MU_BASE_TOKENS = 256  # mu = sqrt(input-image tokens / 256) (the reference's base_seqlen = 256 * 256 / 16 / 16)
RGBA_LAYER = 0  # row of the additional timestep embedding the reference uses for every RGBA layer ("is_rgb" 0)
# the reference's layer-3D RoPE table has positions 0..4095: the layer frames 0..N, then up to 1024 text tokens
ROPE_POSITIONS, MAX_TEXT_TOKENS = 4096, 1024
MAX_LAYERS = ROPE_POSITIONS - MAX_TEXT_TOKENS - 1
DEFAULT_NEGATIVE = " "  # the model card's negative prompt

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]  # (step, steps, x, denoised x0)


@dataclass
class Decomposition:
    """The result of `decompose`: RGBA float tensors in [0, 1]."""

    layers: torch.Tensor  # [B * N, 4, H, W], layer 1..N of each picture in turn (what the reference returns)
    composite: torch.Tensor  # [B, 4, H, W], the model's frame 0 (the reference drops it)
    latents: torch.Tensor  # [B, 16, N + 1, h, w] normalised, frame 0 the composite


def check_dit(dit: MMDiT, what: str = "the diffusion model") -> None:
    """Refuse a DiT without the layered options, naming the input."""
    cfg = dit.config
    if not (cfg.layer3d_rope and cfg.additional_t_cond):
        raise ValueError(
            f"{what} is not a Qwen-Image-Layered model (it has no layer-3D RoPE / additional timestep "
            "condition): load qwen_image_layered_bf16 or _fp8mixed"
        )


def check_vae(vae: ImageVAE, what: str = "the VAE") -> None:
    """Refuse a VAE that is not RGBA, naming the input."""
    if vae.cfg.image_channels != 4:
        raise ValueError(
            f"{what} takes {vae.cfg.image_channels}-channel images; layer decomposition needs the RGBA VAE "
            "(qwen_image_layered_vae)"
        )


def check_layers(layers: int, what: str = "layers") -> None:
    if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= MAX_LAYERS:
        raise ValueError(f"{what} is {layers!r}: Qwen-Image-Layered makes 1..{MAX_LAYERS} layers")


def layered_size(width: int, height: int, resolution: int = 640) -> tuple[int, int]:
    """(width, height) of the layers for a width x height picture: about resolution^2 pixels, sides of 32."""
    if resolution <= 0 or resolution % SIZE_MULTIPLE:
        raise ValueError(f"resolution {resolution} must be a positive multiple of {SIZE_MULTIPLE} (640 or 1024)")
    w, h = calculate_dimensions(resolution * resolution, width / height, SIZE_MULTIPLE)
    return max(w, SIZE_MULTIPLE), max(h, SIZE_MULTIPLE)


def to_rgba(image, alpha: torch.Tensor | None = None) -> Image.Image:
    """An RGBA PIL image from PIL (any mode) or a float tensor [(1,) H, W, 3|4] in [0, 1]; 3 channels get
    `alpha` [H, W] in [0, 1] if given, else an opaque alpha."""
    if isinstance(image, Image.Image):
        if alpha is not None:
            raise ValueError("alpha is for tensor images; a PIL image carries its own")
        return image.convert("RGBA")
    a = image.detach().cpu().float() if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
    if a.dim() == 4 and a.shape[0] == 1:
        a = a[0]
    if a.dim() != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"image: expected [H, W, 3] or [H, W, 4] in [0, 1], got shape {tuple(a.shape)}")
    if a.shape[-1] == 3:
        al = torch.ones(a.shape[:2]) if alpha is None else alpha.detach().cpu().float().reshape(a.shape[:2])
        a = torch.cat([a, al[..., None]], dim=-1)
    u8 = (a.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(u8, "RGBA")


def prepare_image(image, resolution: int = 640, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """The picture as the reference feeds it to the VAE: [1, 4, H, W] in [-1, 1] at `layered_size`."""
    pil = to_rgba(image, alpha)
    w, h = layered_size(pil.width, pil.height, resolution)
    if pil.size != (w, h):
        pil = pil.resize((w, h), resample=Image.LANCZOS)  # Pillow resamples RGBA premultiplied
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).movedim(-1, 0)[None]
    return x * 2 - 1


def layered_sigmas(steps: int, cond_latent_hw: tuple[int, int]) -> torch.Tensor:
    """The reference's schedule [steps + 1]: mu from the input image's token count (2x2 patches). One step
    is [1, 0] (`sampling.stretch_to_terminal`; the reference returns NaN there)."""
    h, w = cond_latent_hw
    mu = (sampling.image_seq_len(h, w) / MU_BASE_TOKENS) ** 0.5
    return sampling.sigmas_diffusers(steps, 0, mu=mu)


def layered_noise(batch: int, layers: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Noise [B, 16, N + 1, h, w] drawn in the reference's order [B, N + 1, 16, h, w]."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, layers + 1, LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE)
    return torch.randn(shape, generator=g).transpose(1, 2)


def frame_rescale(guided: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """cfg_normalize on layered velocities [B, 16, F, h, w]: each 2x2-patch token scaled to |cond|."""
    flat = lambda v: v.transpose(1, 2).flatten(0, 1)  # [B*F, 16, h, w]
    out = sampling.token_norm_rescale(flat(guided), flat(cond))
    return out.unflatten(0, guided.shape[:1] + guided.shape[2:3]).transpose(1, 2)


class LayeredDenoiser:
    """The layered DiT as a k-diffusion x0-denoiser on [B, 16, F, h, w], the input image's latent as the
    reference; true CFG (cond and uncond as separate passes, as the reference) with optional cfg_normalize."""

    def __init__(self, dit: MMDiT, image_latent: torch.Tensor, dtype=torch.float32, cfg_scale: float = 1.0,
                 cfg_normalize: bool = False, **dit_kwargs):  # fmt: skip
        self.dit, self.ref, self.dtype = dit, image_latent, dtype
        self.scale, self.normalize, self.kwargs = cfg_scale, cfg_normalize, dit_kwargs

    def velocity(self, x, s, txt, mask):
        ref = self.ref.to(device=x.device, dtype=self.dtype)
        dt = self.dtype
        return self.dit(x.to(dt), s, txt.to(dt), mask, ref_latents=[ref], t_cond=RGBA_LAYER, **self.kwargs).float()

    def __call__(self, x, sigma, cond, cond_mask=None, uncond=None, uncond_mask=None):
        s = sigma.reshape(-1).expand(x.shape[0]).float()
        v = self.velocity(x, s, cond, cond_mask)
        if uncond is not None and self.scale > 1.0:
            v_c, v_u = v, self.velocity(x, s, uncond, uncond_mask)
            v = v_u + self.scale * (v_c - v_u)
            if self.normalize:
                v = frame_rescale(v, v_c)
        return x - s.view(-1, 1, 1, 1, 1) * v


def sample_layers(dit: MMDiT, noise: torch.Tensor, image_latent: torch.Tensor, cond: torch.Tensor,
                  cond_mask: torch.Tensor | None = None, uncond: torch.Tensor | None = None,
                  uncond_mask: torch.Tensor | None = None, sigmas: torch.Tensor | None = None,
                  cfg_scale: float = 4.0, cfg_normalize: bool = False, callback: StepCallback | None = None,
                  **dit_kwargs) -> torch.Tensor:  # fmt: skip
    """Euler from `noise` [B, 16, N + 1, h, w] down `sigmas` with the input image's latent [B|1, 16, h', w']
    and text embeddings (computing in cond's dtype on the DiT's device) -> clean latents, float32."""
    check_dit(dit)
    device = dit.img_in.weight.device
    x = noise.to(device=device, dtype=torch.float32)
    b = x.shape[0]
    rep = lambda t: None if t is None else t.to(device).expand(b, *t.shape[1:]) if t.shape[0] == 1 else t.to(device)
    denoiser = LayeredDenoiser(dit, rep(image_latent), cond.dtype, cfg_scale, cfg_normalize, **dit_kwargs)
    extra = dict(cond=rep(cond), cond_mask=rep(cond_mask))
    if uncond is not None and cfg_scale > 1.0:
        extra.update(uncond=rep(uncond), uncond_mask=rep(uncond_mask))
    steps = len(sigmas) - 1
    on_step = None if callback is None else lambda d: callback(d["i"], steps, d["x"], d["denoised"])
    return sampling.sample_euler(denoiser, x, sigmas, extra, on_step, disable=True)


def decode_layers(vae: ImageVAE, latents: torch.Tensor, **decode_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Layered latents [B, 16, N + 1, h, w] -> (layers [B * N, 4, H, W], composites [B, 4, H, W]) in [0, 1]."""
    check_vae(vae)
    frames = latents.transpose(1, 2)  # [B, N + 1, 16, h, w]
    to01 = lambda z: (vae.decode(z, **decode_kwargs).float() / 2 + 0.5).clamp(0, 1)
    return to01(frames[:, 1:].flatten(0, 1)), to01(frames[:, 0])


@torch.no_grad()
def decompose(
    dit: MMDiT,
    vae: ImageVAE,
    text_encoder: TextEncoder | None,
    image,
    prompt: str,
    layers: int = 4,
    resolution: int = 640,
    negative_prompt: str | None = DEFAULT_NEGATIVE,
    steps: int = 50,
    cfg_scale: float = 4.0,
    cfg_normalize: bool = False,
    seed: int = 0,
    noise: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    max_sequence_length: int = 512,
    callback: StepCallback | None = None,
    prompt_embeds: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    negative_embeds: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> Decomposition:
    """Split `image` (PIL, or a float tensor [H, W, 3|4] in [0, 1] with optional `alpha`) into `layers`
    RGBA layers described by `prompt`; see the module docstring for what follows the reference.

    CFG runs when cfg_scale > 1 and a negative prompt is given (None: no CFG). prompt_embeds /
    negative_embeds: (embeddings, mask) instead of encoding the prompts (then text_encoder may be None).
    """
    check_dit(dit)
    check_vae(vae)
    check_layers(layers)
    device = dit.img_in.weight.device
    if prompt_embeds is None:
        if not prompt or not prompt.strip():
            raise ValueError(
                "prompt is empty: Qwen-Image-Layered needs a caption of the picture (the reference writes one with "
                "Qwen2.5-VL; QwenPix has no captioner): describe the image, in English or Chinese"
            )
        if text_encoder is None:
            raise ValueError("no text encoder: pass prompt_embeds or a text encoder")
    pixels = prepare_image(image, resolution, alpha).to(device=device, dtype=dtype)
    height, width = pixels.shape[-2:]
    image_latent = vae.encode(pixels).float()  # [1, 16, h, w], the posterior mean

    def encode(text):
        embeds, mask = text_encoder.encode(
            [text], None, "t2i", max_sequence_length=max_sequence_length, dtype=dtype, device=device
        )
        return embeds, None if bool(mask.all()) else mask

    cond, cond_mask = prompt_embeds if prompt_embeds is not None else encode(prompt)
    uncond = uncond_mask = None
    if cfg_scale > 1.0 and (negative_prompt is not None or negative_embeds is not None):
        uncond, uncond_mask = negative_embeds if negative_embeds is not None else encode(negative_prompt)
    if noise is None:
        noise = layered_noise(1, layers, height, width, seed)
    expected = (LATENT_CHANNELS, layers + 1, height // VAE_SCALE, width // VAE_SCALE)
    if tuple(noise.shape[1:]) != expected:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected [B, {', '.join(map(str, expected))}]")
    sigmas = layered_sigmas(steps, tuple(image_latent.shape[-2:]))
    latents = sample_layers(
        dit, noise, image_latent, cond.to(dtype), cond_mask, None if uncond is None else uncond.to(dtype),
        uncond_mask, sigmas, cfg_scale, cfg_normalize, callback,
    )  # fmt: skip
    layer_images, composite = decode_layers(vae, latents.to(dtype))
    return Decomposition(layer_images, composite, latents)
