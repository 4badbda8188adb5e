"""Qwen3-VL-8B as Qwen-Image-2.1's condition encoder: the decoder-only language model plus its vision tower.

Only what encoding needs: token embeddings, 36 pre-norm decoder layers (grouped-query attention with per-head
RMSNorm on queries and keys and interleaved multimodal RoPE, SwiGLU MLP), DeepStack (the vision tower's
intermediate features added to the image tokens after the first layers). No `lm_head`, no KV cache.
Module names equal the checkpoint keys (`model.*`, `visual.*`, see `formats/qwen3_vl.py`), so a model built
on the meta device is filled by assignment. Linear weights may stay packed and are dequantised per layer.

Features (as diffusers' Qwen-Image-2.1 pipeline takes them): the output of the LAST decoder layer, before the
final RMSNorm. The norm's weight is part of the file and loaded (the key set is checked) but not applied.

Interleaved M-RoPE (Qwen3-VL): every token has (temporal, height, width) positions; of the 64 rotary
frequencies of a 128-wide head, frequency j turns with the height for j % 3 == 1 and j < 3 * sections[1], with
the width for j % 3 == 2 and j < 3 * sections[2], with the temporal position otherwise. For text all three
are equal, which is ordinary 1D RoPE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import progress
from ..attention import attention
from ..ops import Linear
from ..qwen_vl import MLP, Embedding
from ..vision import RMSNorm, rotate_half
from .vision3 import Vision3Config, VisionTower3


@dataclass(frozen=True)
class Qwen3VLConfig:
    vocab_size: int = 151936  # token embeddings (Qwen3 vocabulary + padding)
    hidden_size: int = 4096  # model width = the condition width the 2.1 DiT expects
    intermediate_size: int = 12288  # SwiGLU width
    num_layers: int = 36  # decoder layers
    num_heads: int = 32  # query heads
    num_kv_heads: int = 8  # key/value heads (grouped-query attention, 4 queries per key/value head)
    head_dim: int = 128  # channels per head
    rms_eps: float = 1e-6  # RMSNorm epsilon (layers, q/k norms)
    rope_theta: float = 5_000_000.0  # RoPE base
    mrope_section: tuple[int, int, int] = (24, 20, 20)  # rotary frequencies per (temporal, height, width)
    vision: Vision3Config | None = Vision3Config()  # None for files without the vision tower

    def __post_init__(self):
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must cover head_dim/2 = {self.head_dim // 2}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} query heads do not group over {self.num_kv_heads} key/value heads")
        if self.vision is not None and self.vision.out_hidden_size != self.hidden_size:
            raise ValueError(f"vision output {self.vision.out_hidden_size} != language width {self.hidden_size}")


def interleaved_mrope(
    position_ids: torch.Tensor, cfg: Qwen3VLConfig, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, L, head_dim] from (temporal, height, width) positions [3, B, L]."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim)
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [3, B, L, head_dim / 2]
    j = torch.arange(cfg.head_dim // 2, device=position_ids.device)
    axis = torch.zeros_like(j)  # which position axis turns frequency j
    for a in (1, 2):
        axis[(j % 3 == a) & (j < 3 * cfg.mrope_section[a])] = a
    freqs = freqs.gather(0, axis.expand(1, *freqs.shape[1:3], -1))[0]  # [B, L, head_dim / 2]
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, L, head_dim], rotate-half layout
    return angles.cos().to(dtype), angles.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3VLConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)  # per head, before the rotation
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_norm(self.q_proj(x).view(b, n, -1, d)).transpose(1, 2)  # [B, H, L, D]
        k = self.k_norm(self.k_proj(x).view(b, n, -1, d)).transpose(1, 2)  # [B, Hkv, L, D]
        v = self.v_proj(x).view(b, n, -1, d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # rows are right-padded, so causality alone is the whole mask (padded rows are discarded later)
        out = attention(q, k, v, causal=True).transpose(1, 2).reshape(b, n, -1)
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3VLConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)  # Qwen2.5-VL's SwiGLU, the same layer

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """The language model: embeddings, decoder layers, final norm (checkpoint prefix `model.`)."""

    def __init__(self, cfg: Qwen3VLConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)  # loaded, not applied to the features (see top)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        deepstack: list[torch.Tensor] = (),
        check: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """x [B, L, hidden] input embeddings, position_ids [3, B, L] -> the last layer's output (not normed).

        deepstack[i] [M, hidden] is added to the M image-token rows (image_mask [B, L]) after layer i.
        check: called before each layer; raise from it to stop (a host's interrupt check)."""
        cos, sin = interleaved_mrope(position_ids, self.cfg, x.dtype)
        for i, layer in enumerate(self.layers):
            if check is not None:
                check()
            x = layer(x, cos, sin)
            progress.step(check, i + 1, len(self.layers))  # a host's progress bar, per layer
            if i < len(deepstack):
                x = x.clone()
                x[image_mask] += deepstack[i].to(x.dtype)
        return x


class Qwen3VL(nn.Module):
    """Qwen3-VL encoder: `model` (language model) and `visual` (vision tower, absent in text-only files)."""

    def __init__(self, cfg: Qwen3VLConfig):
        super().__init__()
        self.cfg = cfg
        self.model = TextModel(cfg)
        self.visual = VisionTower3(cfg.vision) if cfg.vision is not None else None

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        image_features: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
        image_mask: torch.Tensor | None = None,
        check: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """The condition features [B, L, hidden] (last layer, before the final norm), computed in `dtype`.

        input_ids [B, L] (right-padded); position_ids [3, B, L]; image_features (merged [M, hidden], DeepStack
        list) from `encode_images`, for the M tokens where image_mask [B, L] is True, in order.
        """
        x = self.model.embed_tokens(input_ids, dtype)
        deepstack = []
        if image_features is not None:
            merged, deepstack = image_features
            if int(image_mask.sum()) != merged.shape[0]:
                raise ValueError(f"{int(image_mask.sum())} image tokens but {merged.shape[0]} image features")
            x = x.masked_scatter(image_mask[..., None], merged.to(x.dtype))
        return self.model(x, position_ids, image_mask, deepstack, check)

    def encode_images(self, patches: torch.Tensor, grids, check: Callable[[], None] | None = None):
        """(merged [sum of tokens, hidden], DeepStack features) in raster order, one row per `<|image_pad|>`."""
        return self.visual(patches, grids, check)
