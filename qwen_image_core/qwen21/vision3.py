"""The Qwen3-VL vision tower (ViT) of Qwen-Image-2.1's condition encoder, with its DeepStack mergers.

Input: flattened patches [N, 3*2*16*16] of one or more images, each image's patches grouped so that every 4
consecutive patches form one 2x2 merge block (the order `prompts.vision_patches` and transformers' processor
produce), plus each image's grid (t, gh, gw) in 16-px patches.
Output: one vector per merge block, [N/4, out_hidden], in raster order over each image's merged grid, and one
such tensor per DeepStack layer (features of intermediate blocks that the language model adds to the image
tokens' hidden states after its first layers).

Differences from Qwen2.5-VL's tower (`vision.py`, whose 2D RoPE, patch order and packed attention this file
reuses): 16-px patches with a bias, a learned 48x48 position table resampled bilinearly (align_corners) to each
image's grid, LayerNorm instead of RMSNorm, a GELU (tanh) MLP instead of SwiGLU, full attention within each
frame in every block (no windows), and the DeepStack mergers (arXiv 2406.04334).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import progress
from ..ops import Linear, cast_weight
from ..vision import PatchEmbed, PreNormBlock, TowerSizes, VisionAttention, checked_grids, rope_2d


@dataclass(frozen=True)
class Vision3Config(TowerSizes):
    depth: int = 27  # transformer blocks
    hidden_size: int = 1152  # patch-token width
    num_heads: int = 16  # 16 heads x 72 channels
    intermediate_size: int = 4304  # MLP width (GELU, with biases)
    out_hidden_size: int = 4096  # merger output = the language model's hidden size
    in_channels: int = 3  # RGB (RGBA references are composited over white first)
    patch_size: int = 16  # pixels per patch side
    temporal_patch_size: int = 2  # frames per patch (a still image is duplicated)
    merge_size: int = 2  # 2x2 patches -> one language-model token
    num_position_embeddings: int = 2304  # learned position table, a 48 x 48 grid
    deepstack_layers: tuple[int, ...] = (8, 16, 24)  # blocks whose outputs feed the DeepStack mergers
    rope_theta: float = 10000.0  # 2D RoPE base
    norm_eps: float = 1e-6  # LayerNorm epsilon

    def __post_init__(self):
        super().__post_init__()
        if round(self.num_position_embeddings**0.5) ** 2 != self.num_position_embeddings:
            raise ValueError(f"{self.num_position_embeddings} position embeddings are not a square grid")
        if any(not 0 <= i < self.depth for i in self.deepstack_layers):
            raise ValueError(f"DeepStack layers {self.deepstack_layers} outside the {self.depth} blocks")

    @property
    def grid_side(self) -> int:
        return round(self.num_position_embeddings**0.5)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computing in the input's dtype (weights cast per call, as `ops.Linear` does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = (cast_weight(t, None, x.dtype) for t in (self.weight, self.bias))
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class VisionMLP(nn.Module):
    """linear_fc2(gelu_tanh(linear_fc1(x))), with biases."""

    def __init__(self, cfg: Vision3Config):
        super().__init__()
        self.linear_fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(PreNormBlock):
    def __init__(self, cfg: Vision3Config):
        super().__init__()
        self.norm1 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.norm2 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)


class PatchMerger(nn.Module):
    """Each merge block's 4 patch vectors concatenated -> Linear -> GELU -> Linear, with a LayerNorm before
    (over one patch vector for the final merger, over the concatenation for the DeepStack ones)."""

    def __init__(self, cfg: Vision3Config, norm_after_shuffle: bool):
        super().__init__()
        self.width = cfg.hidden_size * cfg.merge_size**2
        self.norm_after_shuffle = norm_after_shuffle
        self.norm = LayerNorm(self.width if norm_after_shuffle else cfg.hidden_size, eps=cfg.norm_eps)
        self.linear_fc1 = Linear(self.width, self.width)
        self.linear_fc2 = Linear(self.width, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.reshape(-1, self.width)) if self.norm_after_shuffle else self.norm(x).reshape(-1, self.width)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


def position_taps(grids: Sequence[tuple[int, int, int]], side: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners) taps into the side x side position table for every patch, in merge-block order:
    indices [N, 4] and weights [N, 4] (float32), as transformers' interpolation helper."""

    def axis(n: int) -> tuple[torch.Tensor, torch.Tensor]:  # [n, 2] taps and weights along one axis
        src = torch.arange(n, dtype=torch.float32) * (side - 1) / max(n - 1, 1)
        floor = src.floor()
        taps = floor.long()[:, None] + torch.arange(2)
        weights = (1 - (src[:, None] - floor[:, None] - torch.arange(2)).abs()).clamp(min=0)
        return taps.clamp(0, side - 1), weights

    indices, weights = [], []
    for t, gh, gw in grids:
        (rt, rw), (ct, cw) = axis(gh), axis(gw)
        idx = rt[:, None, :, None] * side + ct[None, :, None, :]  # [gh, gw, 2, 2]
        wts = rw[:, None, :, None] * cw[None, :, None, :]
        blocks = (gh // merge, merge, gw // merge, merge, 4)  # raster -> merge-block order
        idx = idx.reshape(gh, gw, 4).view(blocks).transpose(1, 2).reshape(-1, 4)
        wts = wts.reshape(gh, gw, 4).view(blocks).transpose(1, 2).reshape(-1, 4)
        indices.append(idx.repeat(t, 1))
        weights.append(wts.repeat(t, 1))
    return torch.cat(indices), torch.cat(weights)


class VisionTower3(nn.Module):
    """Qwen3-VL's ViT; module names equal the checkpoint's `visual.*` keys."""

    def __init__(self, cfg: Vision3Config):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, bias=True)  # Qwen3-VL's patch embedding has a bias
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, norm_after_shuffle=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(cfg, norm_after_shuffle=True) for _ in cfg.deepstack_layers
        )

    def positions(self, grids, dtype: torch.dtype, device) -> torch.Tensor:
        """The learned position embeddings resampled to each image's grid, [N, hidden] in `dtype`."""
        idx, wts = position_taps(grids, self.cfg.grid_side, self.cfg.merge_size)
        table = self.pos_embed.weight
        rows = table[idx.to(table.device)].to(device=device, dtype=torch.float32)  # [N, 4, hidden]
        return (rows * wts.to(device)[:, :, None]).sum(1).to(dtype)

    def forward(
        self, patches: torch.Tensor, grids: Sequence[tuple[int, int, int]], check: Callable[[], None] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """patches [N, patch_dim] in the compute dtype; grids [(t, gh, gw)] per image ->
        (merged features [N/4, out_hidden], DeepStack features: one [N/4, out_hidden] per DeepStack layer).

        check: called before each block; raise from it to stop (a host's interrupt check)."""
        grids = checked_grids(patches, grids)
        x = self.patch_embed(patches) + self.positions(grids, patches.dtype, patches.device)  # [N, hidden]
        cos, sin = rope_2d(grids, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.merge_size, patches.device)
        lengths = [h * w for t, h, w in grids for _ in range(t)]  # attention within each frame
        deepstack = []
        for i, block in enumerate(self.blocks):
            if check is not None:
                check()
            x = block(x, cos, sin, lengths)
            progress.step(check, i + 1, len(self.blocks))  # a host's progress bar, per block
            if i in self.cfg.deepstack_layers:
                deepstack.append(self.deepstack_merger_list[self.cfg.deepstack_layers.index(i)](x))
        return self.merger(x), deepstack
