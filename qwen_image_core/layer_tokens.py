"""Tokens of Qwen-Image-Layered's latents: F frames [B, 16, F, H, W] (the composite, then the RGBA layers).

Frame after frame, each patchified as one image (row-major 2x2 patches), so the token sequence is
[frame 0 | frame 1 | ...], the order diffusers' `QwenImageLayeredPipeline` packs them in; the DiT's
layer-3D RoPE (`rope.joint_positions(..., "layer3d")`) gives frame f the RoPE frame index f.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def frames(img: torch.Tensor, cfg) -> int:
    """F of a layered latent [B, C, F, H, W] (0 for an ordinary [B, C, H, W]); a layered latent is refused by
    a DiT without the layer-3D RoPE, an ordinary one by a DiT with it (`cfg`: its MMDiTConfig)."""
    if img.dim() == 4:
        if cfg.layer3d_rope:
            raise ValueError(
                f"the diffusion model is Qwen-Image-Layered: it decomposes a picture into layers (a latent [B, 16, "
                f"layers + 1, H, W]) and cannot sample an image latent {tuple(img.shape)}; use the Qwen-Image "
                "Layered Sampler node (qwen_image_core.layered)"
            )
        return 0
    if img.dim() != 5:
        raise ValueError(f"the DiT takes latents [B, 16, H, W] or layered [B, 16, F, H, W], got {tuple(img.shape)}")
    if not cfg.layer3d_rope:
        raise ValueError(
            f"a layered latent {tuple(img.shape)} needs a Qwen-Image-Layered DiT (layer-3D RoPE); this DiT has none"
        )
    return img.shape[2]


def patchify_frames(img: torch.Tensor, p: int, patchify: Callable) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, C, F, H, W] -> tokens [B, F*h*w, C*p*p] frame after frame, and the grid (h, w) of one frame."""
    b = img.shape[0]
    x, grid = patchify(img.transpose(1, 2).flatten(0, 1), p)  # [B*F, h*w, C*p*p]
    return x.unflatten(0, (b, -1)).flatten(1, 2), grid


def unpatchify_frames(x: torch.Tensor, grid, p: int, size, frames: int, unpatchify: Callable) -> torch.Tensor:
    """Tokens [B, F*h*w, C*p*p] -> [B, C, F, H, W] (cropped to `size` per frame)."""
    b = x.shape[0]
    out = unpatchify(x.unflatten(1, (frames, -1)).flatten(0, 1), grid, p, size)  # [B*F, C, H, W]
    return out.unflatten(0, (b, frames)).transpose(1, 2)
