"""The InstantX Qwen-Image ControlNet (Union and Inpainting): a few DiT blocks that turn a control latent into
residuals added to the DiT's image stream after its blocks.

The control latent (VAE latent of the control image; for Inpainting the masked image's latent followed by the
inverted mask at latent size) is patchified like the image, embedded by `controlnet_x_embedder` and added to the
embedded noisy latent; the ControlNet's own blocks then run with the (positive) prompt, and `controlnet_blocks[i]`
maps block i's image stream to residual i. The DiT adds residual `i // ceil(n_dit_blocks / n_residuals)` after
its block i (diffusers' `QwenImageTransformer2DModel`; `control.py` holds that hook and the per-step schedule).

Numerics follow diffusers' `QwenImageControlNetModel`; the layers are the DiT's own (`mmdit`), so float8 and
packed weights, RMSNorm / RoPE in float32 and the float16 residual handling are the same.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import rope
from .attention import attention, text_keys
from .checkpoint import CheckpointError
from .formats import controlnet as cn_format
from .formats.common import assign_weights
from .mmdit import DoubleStreamBlock, MMDiTConfig, RMSNorm, TimeTextEmbed, patchify, timestep_sinusoid
from .ops import Linear


class InstantXControlNet(nn.Module):
    """`net(img, sigma, txt, control)` -> one residual [B, N, hidden] per ControlNet block (unscaled)."""

    def __init__(self, config: MMDiTConfig, extra_channels: int = 0):
        super().__init__()
        cfg = self.config = config
        self.extra_channels = extra_channels  # 0: Union; 4: Inpainting (1 mask channel x 2 x 2 patch)
        self.storage, self.path = "", None  # set by load_controlnet
        self.img_in = Linear(cfg.in_channels, cfg.hidden)
        self.txt_norm = RMSNorm(cfg.text_dim, cfg.eps)
        self.txt_in = Linear(cfg.text_dim, cfg.hidden)
        self.time_text_embed = TimeTextEmbed(cfg.timestep_dim, cfg.hidden)
        self.transformer_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.num_layers))
        self.controlnet_blocks = nn.ModuleList(Linear(cfg.hidden, cfg.hidden) for _ in range(cfg.num_layers))
        self.controlnet_x_embedder = Linear(cfg.in_channels + extra_channels, cfg.hidden)

    @property
    def kind(self) -> str:
        return cn_format.KINDS[self.extra_channels]

    @property
    def control_channels(self) -> int:
        """Channels of the control latent it takes: 16, or 17 (masked-image latent + inverted mask)."""
        return (self.config.in_channels + self.extra_channels) // self.config.patch_size**2

    def forward(
        self,
        img: torch.Tensor,
        timestep: torch.Tensor,
        txt: torch.Tensor,
        control: torch.Tensor,
        txt_mask: torch.Tensor | None = None,
        positions: str = "official",
        attention_fn: Callable | None = None,
        txt_lengths: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """Residuals [B, N, hidden] in the input latent's dtype (float32 streams in float16).

        img [B, 16, H, W] normalised noisy latent; timestep [B] sigma; txt [B, L, text_dim] (+ txt_mask [B, L] or
        txt_lengths as in `MMDiT.forward`); control [B|1, 16 (+1), H, W] the control latent at the latent's size.
        """
        cfg, dt, p = self.config, img.dtype, self.config.patch_size
        b = img.shape[0]
        if control.shape[1] != self.control_channels or control.shape[-2:] != img.shape[-2:]:
            raise ValueError(
                f"the {self.kind} ControlNet takes a control latent of {self.control_channels} channels at the "
                f"latent's size {tuple(img.shape[-2:])}, got {tuple(control.shape[1:])}"
            )
        stream_dt = torch.float32 if dt == torch.float16 else dt
        x, grid = patchify(img, p)  # [B, N, 64]
        c, _ = patchify(control.expand(b, *control.shape[1:]).to(dt), p)  # [B, N, 64 (+4)]
        h = (self.img_in(x.to(dt)) + self.controlnet_x_embedder(c)).to(stream_dt)

        temb, attend, key_mask, pe = branch_inputs(
            self.time_text_embed, cfg, img, timestep, txt, grid, txt_lengths, txt_mask, positions, attention_fn
        )

        t = self.txt_in(self.txt_norm(txt.to(dt))).to(stream_dt)  # [B, L, D]
        out = []
        for block, proj in zip(self.transformer_blocks, self.controlnet_blocks, strict=True):
            h, t = block(h, t, temb, pe, key_mask, None, attend)
            out.append(proj(h.to(dt)).to(stream_dt))
        return out


def branch_inputs(
    time_text_embed, cfg: MMDiTConfig, img, timestep, txt, grid, txt_lengths, txt_mask, positions, attend
):
    """What a control branch beside the DiT needs for the latent `img` [B, C, H, W] (one target, no references,
    `grid` its token grid): the timestep embedding [B, D] in img's dtype, the attention call and key mask over
    text + image tokens (`attention.text_keys`), and the rotary table of the joint sequence."""
    b, dev = img.shape[0], img.device
    timestep = torch.as_tensor(timestep, device=dev).float().reshape(-1).expand(b)
    temb = time_text_embed.timestep_embedder(timestep_sinusoid(timestep, cfg.timestep_dim).to(img.dtype))
    txt_mask = None if txt_mask is None else txt_mask.to(dev)
    attend, key_mask = text_keys(attend or attention, b, txt.shape[1], txt_lengths, txt_mask)
    if key_mask is not None:
        key_mask = torch.cat([key_mask, key_mask.new_ones(b, grid[0] * grid[1])], dim=1)
    pos = rope.joint_positions([grid], txt.shape[1], dev, positions)  # [L + N, 3]
    pe = rope.rope_table(pos, cfg.rope_axes, cfg.rope_theta, rope.CONVENTIONS[positions])
    return temb, attend, key_mask, pe


def load_controlnet(path: str | os.PathLike, *, mmap: bool = False, **sizes) -> InstantXControlNet:
    """Load an InstantX ControlNet (Union or Inpainting) from a ComfyUI single file or a diffusers folder.

    Weights are held in their stored dtype (float8 stays float8, dequantised per layer at the cast); sizes come
    from `sizes` (MMDiTConfig fields), the config.json / `config` metadata, then the shapes. A file of another
    family (a DiT, a Flux or SDXL ControlNet, a DiffSynth patch) is a CheckpointError naming it.
    """
    unknown = sorted(set(sizes) - set(MMDiTConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"load_controlnet: unknown size {', '.join(unknown)}; expected MMDiTConfig fields")
    w = cn_format.read_controlnet(path, mmap=mmap, overrides={k: v for k, v in sizes.items() if v is not None})
    try:
        cfg = MMDiTConfig(**w.config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{w.path}: inconsistent Qwen-Image ControlNet sizes ({e})") from None
    with torch.device("meta"):
        net = InstantXControlNet(cfg, w.extra_channels)
    assign_weights(net, w.tensors, w.scales, w.path, f"InstantX Qwen-Image ControlNet ({w.kind})", w.packed)
    net.storage, net.path = w.storage, w.path
    return net.requires_grad_(False).eval()
