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

`convention="comfyui"` reproduces ComfyUI's native Qwen-Image model instead (a seed carried over from a
native workflow then gives the same image): rows/columns centred as -(n//2) .. n - 1 - n//2, text from the
target grid alone, angles in float64 before the float32 table. `ref_layout="offset"` is ComfyUI's other
reference layout (FluxKontextMultiReferenceLatentMethod "offset" / "uxo"): every reference at frame 1,
placed beside the previous ones (to the right or below, whichever keeps the canvas squarer).
`ref_layout="layer3d"` is Qwen-Image-Layered's layer-3D RoPE (diffusers' `QwenEmbedLayer3DRope`): image n
of the list sits at frame n except the last (the input image), which sits at frame -1, and the text
starts at max(s, number of images - 1).
"""

from __future__ import annotations

import torch

# position conventions -> the precision of their angles: diffusers (the official code) float32, ComfyUI native float64
CONVENTIONS = {"official": torch.float32, "comfyui": torch.float64}
# references at frames 1, 2, ... / all at frame 1, tiled / layers at frames 0..n-2 and the input image at -1
REF_LAYOUTS = ("index", "offset", "layer3d")


def centred(n: int, device=None, convention: str = "official") -> torch.Tensor:
    """Integer positions of n rows (or columns) centred on zero: official -(n - n//2) .. n//2 - 1,
    comfyui -(n//2) .. n - 1 - n//2 (the same for even n)."""
    return torch.arange(n, device=device) - (n - n // 2 if convention == "official" else n // 2)


def image_positions(
    frame: int, h: int, w: int, device=None, convention: str = "official", offset: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Positions [h*w, 3] (frame, row, col) of an h x w token grid, row-major like the patchified tokens;
    `offset` (rows, cols) shifts the grid (the "offset" reference layout)."""
    rows = (centred(h, device, convention) + offset[0])[:, None].expand(h, w)
    cols = (centred(w, device, convention) + offset[1])[None, :].expand(h, w)
    frames = torch.full((h, w), frame, device=device)
    return torch.stack([frames, rows, cols], dim=-1).reshape(h * w, 3)


def text_start(grids: list[tuple[int, int]], convention: str = "official") -> int:
    """First text position: max(h//2, w//2) over every image grid (official) or the target's alone (comfyui)."""
    return max(max(h // 2, w // 2) for h, w in (grids if convention == "official" else grids[:1]))


def reference_offsets(ref_sizes: list[tuple[int, int]], patch: int = 2) -> list[tuple[int, int]]:
    """Token offsets (rows, cols) of references in the "offset" layout, from their latent sizes (h, w):
    each goes right of the canvas so far when that keeps it squarer, else below (ComfyUI's rule)."""
    out, h, w = [], 0, 0
    for rh, rw in ref_sizes:
        dh, dw = (0, w) if rh + h > rw + w else (h, 0)
        h, w = max(h, rh + dh), max(w, rw + dw)
        out.append(((dh + patch // 2) // patch, (dw + patch // 2) // patch))
    return out


def joint_positions(
    grids: list[tuple[int, int]],
    text_len: int,
    device=None,
    convention: str = "official",
    ref_layout: str = "index",
    ref_sizes: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Positions [text_len + sum(h*w), 3] for the joint sequence [text | target | ref 1 | ref 2 | ...].

    `ref_sizes`: the references' latent sizes (h, w), needed by the "offset" layout.
    """
    if convention not in CONVENTIONS or ref_layout not in REF_LAYOUTS:
        raise ValueError(f"positions: convention {convention!r} / ref_layout {ref_layout!r} unknown")
    s = text_start(grids, convention)
    if ref_layout == "layer3d":  # Qwen-Image-Layered: the text also starts after the last layer index
        if convention != "official":
            raise ValueError("positions: the layer-3D RoPE exists only in the official convention")
        s = max(s, len(grids) - 1)
    txt = torch.arange(s, s + text_len, device=device)[:, None].expand(text_len, 3)
    imgs = [image_positions(0, *grids[0], device, convention)]
    if ref_layout == "layer3d":
        frames = [*range(len(grids) - 1), -1] if len(grids) > 1 else [-1]
        imgs = [image_positions(f, h, w, device, convention) for f, (h, w) in zip(frames, grids, strict=True)]
    elif ref_layout == "index":
        imgs += [image_positions(i, h, w, device, convention) for i, (h, w) in enumerate(grids[1:], 1)]
    else:
        offsets = reference_offsets(ref_sizes if ref_sizes is not None else [(2 * h, 2 * w) for h, w in grids[1:]])
        imgs += [image_positions(1, h, w, device, convention, o) for (h, w), o in zip(grids[1:], offsets, strict=True)]
    return torch.cat([txt, *imgs], dim=0)


def rope_table(pos: torch.Tensor, axes: tuple[int, ...], theta: float, precision=torch.float32) -> torch.Tensor:
    """Rotation matrices [N, sum(axes)/2, 2, 2] (float32) of each token's angle per channel pair; the angles
    are computed in `precision` (float32 as the official code, float64 as ComfyUI)."""
    angles = []
    for i, d in enumerate(axes):
        inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=precision, device=pos.device) / d)  # [d/2]
        angles.append(pos[:, i, None].to(torch.float32) * inv_freq)  # [N, d/2]
    a = torch.cat(angles, dim=-1)
    cos, sin = a.cos(), a.sin()
    table = torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))  # [[cos, -sin], [sin, cos]]
    return table.to(torch.float32)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, N, H, D] by rot [N, D/2, 2, 2]; float32 inside, x's dtype out.

    (x0, x1) -> (cos x0 - sin x1, sin x0 + cos x1): the complex product (x0 + i x1) e^(i angle). x is read in its
    own dtype: the products with the float32 table promote to float32 inside the kernels (the same numbers as an
    upcast copy first, bit for bit, without writing and reading that float32 copy).
    """
    pairs = x.unflatten(-1, (-1, 1, 2))  # [B, N, H, D/2, 1, 2]
    rot = rot[:, None]  # [N, 1, D/2, 2, 2], broadcast over heads
    out = rot[..., 0] * pairs[..., 0]  # [B, N, H, D/2, 2]
    out.addcmul_(rot[..., 1], pairs[..., 1])
    return out.flatten(-2).to(x.dtype)
