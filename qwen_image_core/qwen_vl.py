"""Qwen2.5-VL as a condition encoder: the decoder-only language model plus (optionally) its vision tower.

Only what encoding needs: token embeddings, 28 pre-norm decoder layers (grouped-query attention with
multimodal RoPE, SwiGLU MLP), the final RMSNorm. No `lm_head`, no KV cache, no generation. Module names
equal the legacy checkpoint keys (`model.*`, `visual.*`), so a model built on the meta device is filled
by assignment from the checkpoint. Linear weights may stay float8 and are dequantised per layer.

M-RoPE (Qwen2-VL, arXiv 2409.12191): every token has a (temporal, height, width) position; of the 64
rotary frequencies of a 128-wide head, the first 16 turn with the temporal position, the next 24 with
the height, the last 24 with the width. For text all three are equal, which is ordinary 1D RoPE.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import progress
from .attention import attention
from .formats import qwen_vl as qwen_vl_format
from .ops import Linear, cast_weight
from .vision import RMSNorm, VisionConfig, VisionTower, rotate_half


@dataclass(frozen=True)
class QwenVLConfig:
    vocab_size: int = 152064  # token embeddings (151,665 used + padding)
    hidden_size: int = 3584  # model width = the condition width the DiT expects
    intermediate_size: int = 18944  # SwiGLU width
    num_layers: int = 28  # decoder layers
    num_heads: int = 28  # query heads
    num_kv_heads: int = 4  # key/value heads (grouped-query attention, 7 queries per key/value head)
    head_dim: int = 128  # channels per head
    rms_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 1_000_000.0  # RoPE base
    mrope_section: tuple[int, int, int] = (16, 24, 24)  # rotary frequencies per (temporal, height, width)
    vision: VisionConfig | None = VisionConfig()  # None for files without the vision tower

    def __post_init__(self):
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must cover head_dim/2 = {self.head_dim // 2}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} query heads do not group over {self.num_kv_heads} key/value heads")

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], where="the weights", **known) -> QwenVLConfig:
        """The configuration from legacy-named weight shapes and `known` sizes (overrides, config.json; "vision":
        VisionConfig fields), which win. What the shapes cannot tell (head widths) is Qwen2.5-VL's own, or a
        CheckpointError where the widths do not fit it (see `formats.qwen_vl.config_fields`)."""
        fields = qwen_vl_format.config_fields(shapes, known, where)
        vision = fields.pop("vision")
        return cls(**fields, vision=VisionConfig(**vision) if vision is not None else None)


def mrope(position_ids: torch.Tensor, cfg: QwenVLConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, L, head_dim] from (temporal, height, width) positions [3, B, L]."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim)
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [3, B, L, head_dim / 2]
    parts = freqs.split(list(cfg.mrope_section), dim=-1)
    freqs = torch.cat([p[i] for i, p in enumerate(parts)], dim=-1)  # [B, L, head_dim / 2]: axis i for section i
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, L, head_dim], rotate-half layout
    return angles.cos().to(dtype), angles.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_proj(x).view(b, n, -1, d).transpose(1, 2)  # [B, H, L, D]
        k = self.k_proj(x).view(b, n, -1, d).transpose(1, 2)  # [B, Hkv, L, D]
        v = self.v_proj(x).view(b, n, -1, d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # rows are right-padded, so causality alone is the whole mask (padded rows are discarded later)
        out = attention(q, k, v, causal=True).transpose(1, 2).reshape(b, n, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU without biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Module):
    """Token embeddings kept in their stored dtype; the looked-up rows are cast to the compute dtype. A packed
    table (`quant`, e.g. comfy_quant int8 / fp8, set by `formats.common.assign_weights`) dequantises only
    the gathered rows."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim))
        self.register_buffer("weight_scale", None, persistent=False)
        self.quant = None

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.gather(self.weight, {n: getattr(self, n) for n in self.quant.extras}, ids, dtype)
        return cast_weight(self.weight[ids], self.weight_scale, dtype)


class TextModel(nn.Module):
    """The language model: embeddings, decoder layers, final norm (checkpoint prefix `model.`)."""

    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, check: Callable[[], None] | None = None
    ) -> torch.Tensor:
        """x [B, L, hidden] input embeddings, position_ids [3, B, L] -> final-normed hidden states.

        check: called before each layer; raise from it to stop (a host's interrupt check)."""
        cos, sin = mrope(position_ids, self.cfg, x.dtype)
        for i, layer in enumerate(self.layers):
            if check is not None:
                check()
            x = layer(x, cos, sin)
            progress.step(check, i + 1, len(self.layers))
        return self.norm(x)


class QwenVL(nn.Module):
    """Qwen2.5-VL encoder: `model` (language model) and `visual` (vision tower, absent in text-only files)."""

    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.cfg = cfg
        self.model = TextModel(cfg)
        self.visual = VisionTower(cfg.vision) if cfg.vision is not None else None

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        image_embeds: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        check: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Last hidden state after the final norm, [B, L, hidden], computed in `dtype`.

        input_ids [B, L] (right-padded); position_ids [3, B, L]; image_embeds [M, hidden] replace, in
        order, the M tokens where image_mask [B, L] is True. check: called between layers (see TextModel).
        """
        x = self.model.embed_tokens(input_ids, dtype)
        if image_embeds is not None:
            if int(image_mask.sum()) != image_embeds.shape[0]:
                raise ValueError(f"{int(image_mask.sum())} image tokens but {image_embeds.shape[0]} image features")
            x = x.masked_scatter(image_mask[..., None], image_embeds.to(x.dtype))
        return self.model(x, position_ids, check)

    def encode_images(self, patches: torch.Tensor, grids, check: Callable[[], None] | None = None) -> torch.Tensor:
        """Vision features [sum of tokens, hidden] in raster order, one row per `<|image_pad|>` token."""
        return self.visual(patches, grids, check)
