"""The Fun ControlNet Union (2512) in sampling: control contexts from images, several Fun ControlNets with strengths
and start / end fractions, their hints fed to the DiT through its block_hook, and Fun ControlNet text-to-image.

Semantics (VideoX-Fun videox_fun/pipeline/pipeline_qwenimage_control.py, QwenImageControlPipeline; see
`controlnet_fun` for the model): the control image is resized to the output size (Lanczos), scaled to [-1, 1] and
VAE-encoded as the posterior mean (no sampling); inpainting adds the repaint mask (binarised at 0.5; its inverse
at latent size, nearest) and the latent of the image with the repaint pixels set to 0. The hints, times the
strength (control_context_scale), are added after their DiT blocks in every pass, cond and uncond rows each
computed with its own prompt. start / end: step i of N runs a net only when start <= i / N and (i + 1) / N <= end
(the InstantX path's fractions, `control.Control`). Several nets sum their scaled hints; InstantX ControlNets
(`controls=`) act beside them. With reference latents (edit models) the branch sees the target alone (its own
RoPE table from the target's grid, as newer ComfyUI's Fun ControlNet) and its hints enter the target's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .control import binary_mask, pixels
from .controlnet_fun import FunControlNet, context_latent
from .mmdit import MMDiT
from .sizes import DIT_MULTIPLE, LATENT_CHANNELS, VAE_SCALE


@dataclass
class FunControl:
    """One Fun ControlNet applied in sampling: its context, strength and active fraction of the steps (the
    fractions as `control.Control`'s)."""

    net: FunControlNet
    context: torch.Tensor  # [B|1, 33 (or 16), h, w] at the output latent's size
    strength: float = 1.0  # VideoX-Fun's control_context_scale, ComfyUI's ControlNet strength
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"Fun ControlNet start {self.start} / end {self.end}: need 0 <= start <= end <= 1")

    def active(self, step: int, steps: int) -> bool:
        return self.strength != 0.0 and not (step / steps < self.start or (step + 1) / steps > self.end)


def hint_hook(hints: dict[int, torch.Tensor], inner=None):
    """A DiT block_hook adding hints[i] to the target's tokens after block i (after `inner`, another hook)."""

    def hook(i, run, img, txt, temb, pe):
        img, txt = run(img, txt, temb, pe) if inner is None else inner(i, run, img, txt, temb, pe)
        add = hints.get(i)
        if add is None:
            return img, txt
        add = add.repeat(img.shape[0] // add.shape[0], 1, 1).to(img.dtype)
        n = add.shape[1]
        return torch.cat([img[:, :n] + add, img[:, n:]], dim=1), txt

    return hook


def scaled_sum(parts: Sequence[tuple[float, dict[int, torch.Tensor]]]) -> dict[int, torch.Tensor]:
    """The hints of several nets, each times its strength, summed per DiT block."""
    out: dict[int, torch.Tensor] = {}
    for strength, hints in parts:
        for i, h in hints.items():
            out[i] = h * strength if i not in out else out[i] + h * strength
    return out


class FunForward:
    """The DiT call of `pipeline.sample(..., forward=FunForward(dit, controls, sigmas))`: each call runs the
    active Fun ControlNets on the call's own batch (cond and uncond rows, each with its prompt) and adds their
    hints through the DiT's block_hook (after any other hook, e.g. InstantX ControlNets')."""

    def __init__(self, dit: MMDiT, controls: Sequence[FunControl], sigmas: torch.Tensor, positions="official"):
        self.dit, self.controls, self.positions = dit, list(controls), positions
        self.sigmas = sigmas[:-1].double()
        for c in self.controls:
            c.net.check_dit(dit)

    def step_of(self, sigma) -> int:
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        return int((self.sigmas - s).abs().argmin())

    def __call__(self, x, sigma, txt, txt_mask=None, *, block_hook=None, txt_lengths=None, **kw):
        step, steps = self.step_of(sigma), len(self.sigmas)
        active = [c for c in self.controls if c.active(step, steps)]
        if active:
            parts = [
                (c.strength, c.net(self.dit, x, sigma, txt, c.context.to(x.device), txt_mask, self.positions,
                                   txt_lengths=txt_lengths))
                for c in active
            ]  # fmt: skip
            block_hook = hint_hook(scaled_sum(parts), block_hook)
        return self.dit(x, sigma, txt, txt_mask, block_hook=block_hook, txt_lengths=txt_lengths, **kw)


@dataclass
class FunControlImage:
    """A Fun ControlNet and its control image; for its inpaint mode also a mask (1 = repaint) and the image."""

    net: FunControlNet
    image: object = None  # the control image: PIL or [B, 3, H, W] / [B, H, W, 3] tensor in [0, 1]; None: none
    strength: float = 1.0  # control_context_scale (the model card advises 0.70 - 0.95)
    start: float = 0.0
    end: float = 1.0
    mask: object = None  # PIL or [B, 1, H, W] / [B, H, W] tensor in [0, 1] (1 = repaint); inpaint mode
    inpaint: object = None  # the image to inpaint (PIL or tensor in [0, 1]); inpaint mode


def fun_context(pipe, spec: FunControlImage, width: int, height: int, batch: int) -> torch.Tensor:
    """The control context [B, 33, h, w] of one FunControlImage (see the module docstring)."""
    if spec.image is None and spec.inpaint is None:
        raise ValueError("image: the Fun ControlNet needs a control image, an image to inpaint, or both")
    if (spec.mask is None) != (spec.inpaint is None):
        raise ValueError("mask / inpaint: the Fun ControlNet's inpaint mode takes both the mask and the image")

    def encoded(px):
        px = px.expand(batch, -1, -1, -1) if px.shape[0] == 1 else px
        return pipe.encode_images(px, sample=False).float()

    control = None if spec.image is None else encoded(pixels(spec.image, width, height))
    if spec.mask is None:
        return context_latent(control)
    px = pixels(spec.inpaint, width, height)
    m = binary_mask(spec.mask, width, height)
    if m.shape[0] not in (1, px.shape[0]):
        raise ValueError(f"mask has a batch of {m.shape[0]}; the image to inpaint has {px.shape[0]}")
    inpaint = encoded(px * (m < 0.5))  # repaint pixels set to 0 (mid grey) before encoding
    return context_latent(control, m, inpaint)


def generate(
    pipe,
    prompt: str | Sequence[str],
    controls: Sequence[FunControlImage],
    negative_prompt: str | Sequence[str] | None = None,
    width: int = 1024,
    height: int = 1024,
    steps: int = 50,
    cfg_scale: float = 4.0,
    seed: int = 0,
    schedule="dynamic",
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    max_sequence_length: int = 512,
    instantx: Sequence = (),
) -> torch.Tensor:
    """Fun ControlNet text-to-image (and inpainting) with a `pipeline.QwenImagePipeline`: [B, 3, H, W] in [0, 1].
    The contexts are posterior means (no random draw), so the noise is the plain pipeline's for the seed;
    `instantx`: `control.Control`s applied beside the Fun nets."""
    from .pipeline import _batch, make_sigmas  # noqa: PLC0415 (pipeline imports nothing from here)

    if not controls:
        raise ValueError("controls: give at least one FunControlImage (or use pipeline.generate)")
    width, height = width // DIT_MULTIPLE * DIT_MULTIPLE, height // DIT_MULTIPLE * DIT_MULTIPLE
    prompts = _batch(prompt, batch_size)
    g = torch.Generator().manual_seed(seed)
    made = [
        FunControl(c.net, fun_context(pipe, c, width, height, len(prompts)), c.strength, c.start, c.end)
        for c in controls
    ]
    noise = torch.randn((len(prompts), LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE), generator=g)
    cond, uncond = pipe.encode_t2i(prompts, negative_prompt, cfg_scale, dtype, max_sequence_length)
    sigmas = make_sigmas(schedule, steps, height, width)
    forward = FunForward(pipe.dit, made, sigmas)
    latents = pipe.sample(noise, cond, uncond, sigmas=sigmas, cfg_scale=cfg_scale, controls=instantx, forward=forward)
    return pipe.decode(latents.to(dtype))
