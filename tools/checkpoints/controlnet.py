"""Writers of random ControlNet files in the real layouts: InstantX Qwen-Image ControlNet (Union and, with 4 extra
condition channels, Inpainting), as the Comfy-Org repacks and diffusers' QwenImageControlNetModel store them.

An InstantX ControlNet is the DiT's own input layers and first blocks (same key names, without norm_out and
proj_out) plus `controlnet_blocks.<i>` (hidden -> hidden, one per block) and `controlnet_x_embedder` (the
patchified control latent, 64 + extra channels -> hidden).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwen_image_core.mmdit import MMDiTConfig

from .dit import random_tensor, shapes, write_safetensors


def instantx_shapes(cfg: MMDiTConfig, extra_channels: int = 0) -> dict[str, tuple[int, ...]]:
    out = {k: s for k, s in shapes(cfg).items() if not k.startswith(("norm_out.", "proj_out."))}
    h = cfg.hidden
    for i in range(cfg.num_layers):
        out[f"controlnet_blocks.{i}.weight"] = (h, h)
        out[f"controlnet_blocks.{i}.bias"] = (h,)
    out["controlnet_x_embedder.weight"] = (h, cfg.in_channels + extra_channels)
    out["controlnet_x_embedder.bias"] = (h,)
    return out


def write_instantx(path, cfg: MMDiTConfig, seed: int = 0, dtype=torch.bfloat16, extra_channels: int = 0) -> Path:
    layout = instantx_shapes(cfg, extra_channels)
    entries = [(k, s, dtype, lambda k=k, s=s: random_tensor(k, s, seed)) for k, s in layout.items()]
    return write_safetensors(Path(path), entries)
