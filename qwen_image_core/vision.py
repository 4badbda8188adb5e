"""The Qwen2.5-VL vision tower (ViT): patch embedding, 2D RoPE, window attention, 2x2 patch merger.

Input: flattened patches [N, 3*2*14*14] of one or more images, each image's patches grouped so that
every 4 consecutive patches form one 2x2 merge block (the order the preprocessing in `prompts.py` and
transformers' processor produce), plus each image's grid (t, gh, gw) in 14-px patches.
Output: one vector per merge block, [N/4, out_hidden], in raster order over each image's merged grid.

Algorithm (Qwen2.5-VL, arXiv 2502.13923): the merge blocks are permuted into window order (windows of
4x4 merge blocks = 112 px); most blocks attend within their window, the `full_attention_blocks` attend
within the whole image; the merger normalises, concatenates each merge block's 4 patch vectors and maps
them through a GELU MLP; finally the window permutation is undone (ComfyUI 0.3.75 forgets this step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import progress
from .attention import attention
from .formats import qwen_vl as qwen_vl_format
from .ops import Linear, cast_weight


class TowerSizes:
    """What a vision tower's config (Qwen2.5-VL's or Qwen3-VL's) derives from its hidden_size, num_heads,
    in_channels and patch sizes; its heads are checked to split for the 2D RoPE."""

    def __post_init__(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"vision hidden {self.hidden_size} does not split into {self.num_heads} heads of 4k")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class VisionConfig(TowerSizes):
    depth: int = 32  # transformer blocks
    hidden_size: int = 1280  # patch-token width
    num_heads: int = 16  # 16 heads x 80 channels
    intermediate_size: int = 3420  # SwiGLU width (with biases)
    out_hidden_size: int = 3584  # merger output = the language model's hidden size
    in_channels: int = 3  # RGB
    patch_size: int = 14  # pixels per patch side
    temporal_patch_size: int = 2  # frames per patch (a still image is duplicated)
    merge_size: int = 2  # 2x2 patches -> one language-model token
    window_size: int = 112  # attention window side in pixels (= 4x4 merge blocks)
    full_attention_blocks: tuple[int, ...] = (7, 15, 23, 31)  # blocks that attend over the whole image
    rope_theta: float = 10000.0  # 2D RoPE base
    rms_eps: float = 1e-6  # RMSNorm epsilon

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], prefix: str = "visual.", **known) -> VisionConfig:
        """The configuration from the weight shapes and `known` sizes; heads are Qwen2.5-VL's 80 channels wide
        unless `known` says otherwise (see `formats.qwen_vl.vision_fields`)."""
        return cls(**qwen_vl_format.vision_fields(shapes, known, "the weights", prefix))


class RMSNorm(nn.Module):
    """RMSNorm as Qwen2 computes it: normalise in float32, cast back, then scale by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Attention within consecutive segments of a packed sequence: q/k/v [N, H, D] -> [N, H, D].

    Segments are gathered into a padded batch [S, H, Lmax, D] with a key mask, so one SDPA call serves
    all windows (or all images) of a block.
    """
    n = q.shape[0]
    if len(lengths) == 1:
        return attention(*(t.transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
    lens = torch.tensor(lengths, device=q.device)
    starts = torch.cumsum(lens, 0) - lens
    pos = torch.arange(int(lens.max()), device=q.device)
    valid = pos[None] < lens[:, None]  # [S, Lmax]
    index = torch.where(valid, starts[:, None] + pos[None], 0).clamp(max=n - 1)
    qb, kb, vb = (t[index].transpose(1, 2) for t in (q, k, v))  # [S, H, Lmax, D]
    out = attention(qb, kb, vb, key_mask=valid).transpose(1, 2)  # [S, Lmax, H, D]
    return out[valid]  # segments are consecutive, so this is the packed order again


class VisionAttention(nn.Module):
    """Fused-qkv self-attention with 2D RoPE over packed segments; the Qwen2.5-VL and Qwen3-VL towers' alike
    (`cfg`: any config with hidden_size and num_heads)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # each [N, H, Dh]
        # rotary in float32, as the reference does, then back to the compute dtype
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        return self.proj(packed_attention(q, k, v, lengths).reshape(n, -1))


class VisionMLP(nn.Module):
    """SwiGLU with biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PreNormBlock(nn.Module):
    """x + attn(norm1(x), ...), then + mlp(norm2(x)): a vision block; subclasses build the four layers."""

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class VisionBlock(PreNormBlock):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = one patch, i.e. a linear map of each flattened (C, T, P, P) patch;
    without a bias in Qwen2.5-VL, with one in Qwen3-VL."""

    def __init__(self, cfg: VisionConfig, bias: bool = False):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        w = cast_weight(self.proj.weight, None, patches.dtype)  # [hidden, C, T, P, P]
        b = None if self.proj.bias is None else cast_weight(self.proj.bias, None, patches.dtype)
        x = F.conv3d(patches.view(-1, *w.shape[1:]), w, b)  # same arithmetic as the reference's Conv3d
        return x.view(patches.shape[0], -1)  # [N, patch_dim] -> [N, hidden]


class PatchMerger(nn.Module):
    """RMSNorm, then each merge block's 4 patch vectors concatenated -> Linear -> GELU -> Linear."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        width = cfg.hidden_size * cfg.merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = nn.Sequential(Linear(width, width), nn.GELU(), Linear(width, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.mlp[0].in_features))


def window_order(grids: Sequence[tuple[int, int, int]], cfg: VisionConfig) -> tuple[torch.Tensor, list[int]]:
    """Merge-block permutation into window order, and the window lengths in patches.

    Each image's merged grid (t, gh/2, gw/2) is cut into windows of `window_size / patch / merge` merge
    blocks per side (edge windows are smaller); windows run row-major, blocks row-major inside a window.
    """
    side = cfg.window_size // cfg.patch_size // cfg.merge_size
    unit = cfg.merge_size**2
    order, lengths, offset = [], [], 0
    for t, gh, gw in grids:
        mh, mw = gh // cfg.merge_size, gw // cfg.merge_size
        index = torch.arange(t * mh * mw).view(t, mh, mw)
        for f in range(t):
            for r in range(0, mh, side):
                for c in range(0, mw, side):
                    win = index[f, r : r + side, c : c + side].reshape(-1)
                    order.append(win + offset)
                    lengths.append(win.numel() * unit)
        offset += t * mh * mw
    return torch.cat(order), lengths


def rope_positions(grids: Sequence[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(row, column) of every patch, [N, 2], in the merge-block-grouped patch order."""
    out = []
    for t, gh, gw in grids:
        rows = torch.arange(gh)[:, None].expand(gh, gw)
        cols = torch.arange(gw)[None, :].expand(gh, gw)
        pos = torch.stack([rows, cols], -1)  # [gh, gw, 2]
        pos = pos.view(gh // merge, merge, gw // merge, merge, 2).transpose(1, 2).reshape(-1, 2)
        out.append(pos.repeat(t, 1))
    return torch.cat(out)


def rope_2d(grids, head_dim: int, theta: float, merge: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, 1, head_dim] of the vision towers' 2D RoPE (Qwen2.5-VL and Qwen3-VL alike): a quarter of the
    head's channels turn with the patch row, a quarter with its column, in rotate-half layout; patches in
    `rope_positions` order."""
    quarter = head_dim // 4
    inv_freq = 1.0 / theta ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float) / (2 * quarter))
    pos = rope_positions(grids, merge).float()
    angles = (pos[:, :, None] * inv_freq).flatten(1)  # [N, 2 * quarter]: row freqs, then column freqs
    angles = torch.cat([angles, angles], -1).to(device)[:, None, :]  # [N, 1, head_dim]
    return angles.cos(), angles.sin()


def checked_grids(patches: torch.Tensor, grids) -> list[tuple[int, ...]]:
    """grids [(t, gh, gw)] as ints; a ValueError unless they hold exactly the N patches [N, patch_dim]."""
    grids = [tuple(int(v) for v in g) for g in grids]
    n = patches.shape[0]
    if n != sum(t * h * w for t, h, w in grids):
        raise ValueError(f"{n} patches do not match the image grids {grids}")
    return grids


class VisionTower(nn.Module):
    """Qwen2.5-VL's ViT; module names equal the checkpoint's `visual.*` keys."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def rope(self, grids, device) -> tuple[torch.Tensor, torch.Tensor]:
        """2D RoPE angles [N, 1, head_dim]: half the frequencies follow the row, half the column."""
        return rope_2d(grids, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.merge_size, device)

    def forward(
        self, patches: torch.Tensor, grids: Sequence[tuple[int, int, int]], check: Callable[[], None] | None = None
    ) -> torch.Tensor:
        """patches [N, patch_dim] in the compute dtype; grids [(t, gh, gw)] per image -> [N/4, out_hidden].

        check: called before each block; raise from it to stop (a host's interrupt check)."""
        grids = checked_grids(patches, grids)
        unit = self.cfg.merge_size**2
        n = patches.shape[0]
        order, window_lengths = window_order(grids, self.cfg)
        frame_lengths = [h * w for t, h, w in grids for _ in range(t)]  # full attention: within each frame
        order = order.to(patches.device)

        def to_windows(x):  # move merge blocks (groups of `unit` patches) into window order
            return x.reshape(n // unit, unit, *x.shape[1:])[order].reshape(n, *x.shape[1:])

        x = to_windows(self.patch_embed(patches))  # [N, hidden]
        cos, sin = (to_windows(a) for a in self.rope(grids, patches.device))
        for i, block in enumerate(self.blocks):
            if check is not None:
                check()
            lengths = frame_lengths if i in self.cfg.full_attention_blocks else window_lengths
            x = block(x, cos, sin, lengths)
            progress.step(check, i + 1, len(self.blocks))
        merged = self.merger(x)  # [N/4, out_hidden], window order
        return merged[torch.argsort(order)]  # back to raster order
