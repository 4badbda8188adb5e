"""MS-RoPE (multimodal scalable rotary position embedding) of the Qwen-Image DiT.

Every token carries a 3-axis position (frame, row, column). A head of `sum(axes)` channels is split into
rotation pairs: the first `axes[0] / 2` pairs turn with the frame index, the next `axes[1] / 2` with the
row, the last `axes[2] / 2` with the column. Pair j of an axis of size d has frequency theta^(-2j/d).
Pairs are adjacent channels (2j, 2j+1) rotated as one complex number (interleaved, not rotate-half).

Positions follow diffusers' `QwenEmbedRope` (the official code):
* image n of the list (n = 0 target, 1, 2, ... references) sits at frame n; rows are centred as
  -(h - h//2) .. h//2 - 1 and columns likewise (for odd sizes this is one lower than ComfyUI 0.3.75);
* text token k sits at s + k on all three axes, s = max over all images of max(h//2, w//2) (ComfyUI
  0.3.75 uses the target image only).
Angles and the rotation are computed in float32 whatever the model dtype.
"""

from __future__ import annotations

import torch


def centred(n: int, device=None) -> torch.Tensor:
    """Integer positions of n rows (or columns) centred on zero: -(n - n//2) .. n//2 - 1."""
    return torch.arange(n, device=device) - (n - n // 2)


def image_positions(frame: int, h: int, w: int, device=None) -> torch.Tensor:
    """Positions [h*w, 3] (frame, row, col) of an h x w token grid, row-major like the patchified tokens."""
    rows = centred(h, device)[:, None].expand(h, w)
    cols = centred(w, device)[None, :].expand(h, w)
    frames = torch.full((h, w), frame, device=device)
    return torch.stack([frames, rows, cols], dim=-1).reshape(h * w, 3)


def text_start(grids: list[tuple[int, int]]) -> int:
    """First text position: max over every image grid (target and references) of max(h//2, w//2)."""
    return max(max(h // 2, w // 2) for h, w in grids)


def joint_positions(grids: list[tuple[int, int]], text_len: int, device=None) -> torch.Tensor:
    """Positions [text_len + sum(h*w), 3] for the joint sequence [text | target | ref 1 | ref 2 | ...]."""
    s = text_start(grids)
    txt = torch.arange(s, s + text_len, device=device)[:, None].expand(text_len, 3)
    imgs = [image_positions(i, h, w, device) for i, (h, w) in enumerate(grids)]
    return torch.cat([txt, *imgs], dim=0)


def rope_table(pos: torch.Tensor, axes: tuple[int, ...], theta: float) -> torch.Tensor:
    """Rotation matrices [N, sum(axes)/2, 2, 2] (float32) of each token's angle per channel pair."""
    angles = []
    for i, d in enumerate(axes):
        inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=pos.device) / d)  # [d/2]
        angles.append(pos[:, i, None].to(torch.float32) * inv_freq)  # [N, d/2]
    a = torch.cat(angles, dim=-1)
    cos, sin = a.cos(), a.sin()
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))  # [[cos, -sin], [sin, cos]]


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, N, H, D] by rot [N, D/2, 2, 2]; float32 inside, x's dtype out.

    (x0, x1) -> (cos x0 - sin x1, sin x0 + cos x1): the complex product (x0 + i x1) e^(i angle).
    """
    pairs = x.float().unflatten(-1, (-1, 1, 2))  # [B, N, H, D/2, 1, 2]
    rot = rot[:, None]  # [N, 1, D/2, 2, 2], broadcast over heads
    out = rot[..., 0] * pairs[..., 0]  # [B, N, H, D/2, 2]
    out.addcmul_(rot[..., 1], pairs[..., 1])
    return out.flatten(-2).to(x.dtype)
