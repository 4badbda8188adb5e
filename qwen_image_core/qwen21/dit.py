"""The Qwen-Image-2.1 diffusion transformer: a 7B, 32-block single-stream DiT with block-causal attention.

Text (Qwen3-VL-8B hidden states), reference latents and the target latent share one token sequence
[prefix | target] (`layout.py`): references replace their image slots in the prompt, the target comes last.
Every block is single-stream (one set of weights for all tokens) and reads its scales and gates from one
modulation shared by all blocks (`modulation`): the target's tokens are modulated by the step's timestep,
the prefix's (text and references) by t = 0 ("causal condition"). Attention is block-causal, so the
prefix never sees the target and its keys and values are the same at every step: `prefill` computes them
once into a `PrefixCache`, and `forward(img, t, cache=...)` then runs the target's tokens only (exactly the
uncached result up to float rounding). The model predicts the flow velocity of the 64-channel latent,
unpatched (one token per latent pixel, 16 x 16 image pixels).

Numerics follow diffusers' `QwenImage21Transformer2DModel`; module names are the keys of Comfy-Org's
`Qwen-Image-2.1` files, where the SwiGLU's gate and up projections are one layer, `img_mlp.gate_up` (gate
rows first; the diffusers folder's `gate_layer` / `proj` are joined at load, `formats/dit21.py`). Linear
layers compute in the input latent's dtype whatever their storage (`ops.Linear`: float8, packed, LoRA);
norms and RoPE run in float32; in float16 the residual streams are float32.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import rope
from ..attention import attention
from ..checkpoint import CheckpointError
from ..formats import dit21 as dit21_format
from ..formats.common import assign_weights
from ..mmdit import RMSNorm, fp16_safe, layer_norm, timestep_sinusoid
from ..ops import Linear
from .attention import PrefixCache, segment_attention
from .layout import build_layout, target_positions


@dataclass(frozen=True)
class DiT21Config:
    """Sizes of the 2.1 DiT; the defaults are the released 7B model (Qwen/Qwen-Image-2.1 and -Turbo)."""

    num_layers: int = 32  # single-stream blocks
    num_heads: int = 32  # attention heads; hidden size = num_heads * head_dim = 4096
    head_dim: int = 128  # channels per head (QK RMSNorm is over these)
    mlp_dim: int = 12288  # SwiGLU hidden size, 3 x 4096
    text_dim: int = 4096  # condition-encoder hidden size (Qwen3-VL-8B)
    in_channels: int = 64  # latent channels of the 2.1 VAE (patch size 1)
    out_channels: int = 64  # latent channels predicted per token
    rope_axes: tuple[int, int, int] = (16, 56, 56)  # head channels for frame / row / column, sum = head_dim
    rope_theta: float = 10000.0  # RoPE base
    eps: float = 1e-6  # LayerNorm and RMSNorm epsilon
    timestep_dim: int = 256  # sinusoidal timestep features (cosines first)
    causal_condition: bool = True  # prefix tokens modulated at t = 0 (what makes the prefix cacheable)

    def __post_init__(self):
        if sum(self.rope_axes) != self.head_dim or any(a % 2 for a in self.rope_axes):
            raise ValueError(f"rope_axes {self.rope_axes} must be even and sum to head_dim {self.head_dim}")

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm whose stored weight is the scale minus one (the checkpoint's `txt_in.text_norm.weight`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(device=x.device, dtype=torch.float32) + 1
        return F.rms_norm(x.float(), x.shape[-1:], w, self.eps).to(x.dtype)


class TextIn(nn.Module):
    """Condition features -> hidden: zero-centred RMSNorm, Linear, GELU(tanh), Linear (no biases)."""

    def __init__(self, cfg: DiT21Config):
        super().__init__()
        self.text_norm = ZeroCenteredRMSNorm(cfg.text_dim, cfg.eps)
        self.in_layer = Linear(cfg.text_dim, cfg.hidden, bias=False)
        self.out_layer = Linear(cfg.hidden, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.gelu(self.in_layer(self.text_norm(x)), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim_in: int, hidden: int):
        super().__init__()
        self.linear_1 = Linear(dim_in, hidden, bias=False)
        self.linear_2 = Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """Holds `timestep_embedder` (the checkpoint's `time_text_embed.timestep_embedder.*`)."""

    def __init__(self, dim_in: int, hidden: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim_in, hidden)


class SwiGLU(nn.Module):
    """out(silu(gate(x)) * up(x)), gate and up as one layer `gate_up` [2 * mlp, D], gate rows first."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = Linear(dim, 2 * hidden, bias=False)
        self.out = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.out(fp16_safe(F.silu(gate) * up))


class Attention21(nn.Module):
    """Q/K/V projections, per-head QK RMSNorm and RoPE; the attention itself is the caller's (block-causal)."""

    def __init__(self, cfg: DiT21Config):
        super().__init__()
        d, self.head_dim = cfg.hidden, cfg.head_dim
        self.to_q, self.to_k, self.to_v = Linear(d, d, bias=False), Linear(d, d, bias=False), Linear(d, d, bias=False)
        self.norm_q, self.norm_k = RMSNorm(cfg.head_dim, cfg.eps), RMSNorm(cfg.head_dim, cfg.eps)
        self.to_out = nn.ModuleList([Linear(d, d, bias=False), nn.Identity()])  # `to_out.1`: the reference's dropout

    def qkv(self, x: torch.Tensor, rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, N, D] -> q, k, v [B, H, N, hd], q and k normed and rotated by rot [N, hd/2, 2, 2]."""

        def heads(t):
            return t.unflatten(-1, (-1, self.head_dim))  # [B, N, H, hd]

        q = rope.apply_rope(self.norm_q(heads(self.to_q(x))), rot)
        k = rope.apply_rope(self.norm_k(heads(self.to_k(x))), rot)
        return q.transpose(1, 2), k.transpose(1, 2), heads(self.to_v(x)).transpose(1, 2)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        return self.to_out[0](o.transpose(1, 2).flatten(2))  # [B, H, N, hd] -> [B, N, D]


@dataclass
class Stream:
    """One stream of tokens through the blocks: hidden [B, N, D], its RoPE table, its modulation
    (1 + scale1, tanh gate1, 1 + scale2, tanh gate2, each [B or 1, 1, D])."""

    h: torch.Tensor
    rot: torch.Tensor
    mod: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Context:
    """What a pass shares across blocks: prefix segments and key padding, the cache and the attention."""

    segments: Sequence[tuple[int, int, bool]]
    key_valid: torch.Tensor | None  # [B|1, P] prefix padding (False = padded text), or None
    cache: PrefixCache | None
    store: bool  # fill `cache` (prefill) instead of reading it
    attend: Callable = attention
    last: int = -1  # index of the last block: its prefix output is never used


def _residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + gate.to(x.dtype) * fp16_safe(y).to(x.dtype)


class SingleStreamBlock(nn.Module):
    """LayerNorm, scale, block-causal attention, gated residual; LayerNorm, scale, SwiGLU, gated residual."""

    def __init__(self, cfg: DiT21Config):
        super().__init__()
        self.eps = cfg.eps
        self.attn = Attention21(cfg)
        self.img_mlp = SwiGLU(cfg.hidden, cfg.mlp_dim)

    def _normed(self, s: Stream, i: int, dt: torch.dtype) -> torch.Tensor:
        return layer_norm(s.h, self.eps).to(dt) * s.mod[i]

    def forward(self, target: Stream | None, prefix: Stream | None, ctx: Context, index: int, dt: torch.dtype):
        """target: the image being denoised (None while prefilling); prefix: text and references (None on a
        cached step, whose prefix keys and values come from ctx.cache). Updates the streams in place."""
        if prefix is not None:
            qp, kp, vp = self.attn.qkv(self._normed(prefix, 0, dt), prefix.rot)
            if ctx.store:
                ctx.cache.put(index, kp, vp)
        else:
            kp, vp = ctx.cache.get(index, target.h.device)
        if target is not None:
            qx, kx, vx = self.attn.qkv(self._normed(target, 0, dt), target.rot)
            b = qx.shape[0]
            k = torch.cat([kp.expand(b, *kp.shape[1:]), kx], dim=2)
            v = torch.cat([vp.expand(b, *vp.shape[1:]), vx], dim=2)
            mask = None
            if ctx.key_valid is not None:
                kv = ctx.key_valid.expand(b, -1)
                mask = torch.cat([kv, kv.new_ones(b, kx.shape[2])], dim=1)
            target.h = _residual(target.h, target.mod[1], self.attn.out(ctx.attend(qx, k, v, mask)))
            target.h = _residual(target.h, target.mod[3], self.img_mlp(self._normed(target, 2, dt)))
        if prefix is not None and index != ctx.last:
            o = segment_attention(qp, kp, vp, ctx.segments, ctx.key_valid, ctx.attend)
            prefix.h = _residual(prefix.h, prefix.mod[1], self.attn.out(o))
            prefix.h = _residual(prefix.h, prefix.mod[3], self.img_mlp(self._normed(prefix, 2, dt)))


class FinalNorm(nn.Module):
    """LayerNorm then scale (1 + linear(silu(temb))); no shift."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale = self.linear(F.silu(temb))[:, None]  # [B, 1, D]
        return layer_norm(x, self.eps).to(temb.dtype) * (1 + scale)


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------


class DiT21(nn.Module):
    """`model(img, sigma, txt, image_slots, ref_latents)` -> velocity; `model.prefill(...)` -> PrefixCache for
    `model(img, sigma, cache=cache)`."""

    def __init__(self, config: DiT21Config):
        super().__init__()
        cfg = self.config = config
        self.storage, self.path = "", None  # set by load_dit21: storage format and file
        self.img_in = Linear(cfg.in_channels, cfg.hidden, bias=False)
        self.txt_in = TextIn(cfg)
        self.time_text_embed = TimeTextEmbed(cfg.timestep_dim, cfg.hidden)
        self.modulation = nn.Sequential(nn.SiLU(), Linear(cfg.hidden, 4 * cfg.hidden, bias=False))
        self.transformer_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_out = FinalNorm(cfg.hidden, cfg.eps)
        self.proj_out = Linear(cfg.hidden, cfg.out_channels, bias=False)

    # -- pieces of a pass
    def _temb(self, sigma: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        return self.time_text_embed.timestep_embedder(timestep_sinusoid(sigma, self.config.timestep_dim).to(dt))

    def _mods(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s1, g1, s2, g2 = self.modulation(temb)[:, None].chunk(4, dim=-1)  # each [rows, 1, D]
        return 1 + s1, g1.tanh(), 1 + s2, g2.tanh()

    def _stream_dtype(self, dt: torch.dtype) -> torch.dtype:
        return torch.float32 if dt == torch.float16 else dt

    def _prefix(self, txt, image_slots, ref_latents, txt_mask, dt, device):
        """The prefix stream (modulated at t = 0), its segments, key padding and the target's RoPE frame."""
        refs = list(ref_latents or [])
        bt = txt.shape[0]
        for i, r in enumerate(refs):
            if r.dim() != 4 or r.shape[1] != self.config.in_channels or r.shape[0] not in (1, bt):
                raise ValueError(
                    f"reference {i + 1}: latent of shape {list(r.shape)}; expected [1 or {bt}, "
                    f"{self.config.in_channels}, h, w]"
                )
        layout = build_layout(txt.shape[1], image_slots, [tuple(r.shape[-2:]) for r in refs])
        text = self.txt_in(txt.to(device=device, dtype=dt))  # [B, L, D]; image-slot rows are dropped below
        parts = []
        for p in layout.pieces:
            if p.is_text:
                parts.append(text[:, p.source])
            else:
                r = refs[p.ref].to(device=device, dtype=dt)
                parts.append(self.img_in(r.flatten(2).transpose(1, 2)).expand(bt, -1, -1))
        h = torch.cat(parts, dim=1).to(self._stream_dtype(dt))  # [B, P, D]
        key_valid = None
        if txt_mask is not None:
            m = txt_mask.to(device=device, dtype=torch.bool)
            if not bool(m.all()):  # one look at the mask; no mask at all when nothing is padded
                cols = [m[:, p.source] if p.is_text else m.new_ones(m.shape[0], p.end - p.start) for p in layout.pieces]
                key_valid = torch.cat(cols, dim=1)
        rot = rope.rope_table(layout.positions.to(device), self.config.rope_axes, self.config.rope_theta)
        temb0 = self._temb(torch.zeros(1, device=device), dt)
        return Stream(h, rot, self._mods(temb0)), layout, key_valid

    def _run(self, target, prefix, ctx, dt):
        for i, block in enumerate(self.transformer_blocks):
            block(target, prefix, ctx, i, dt)

    # -- entry points
    def prefill(self, txt, image_slots=None, ref_latents=None, txt_mask=None, *, dtype=None, attention_fn=None,
                cache_device=None):  # fmt: skip
        """The prefix K/V cache of a condition, computed once for a whole run of steps.

        txt [B, L, text_dim]: the condition encoder's hidden states (image slots included); image_slots [L]
        bool: True at the references' slots (h*w/4 consecutive slots per reference); ref_latents: the
        references [1 or B, 64, h, w] in prompt order; txt_mask [B, L] bool (True = real token) or None;
        dtype: the compute dtype (default: txt's); cache_device: where the cache is kept (default: txt's device;
        "cpu" keeps a large one off the GPU, each block's keys and values then copied in as it runs)."""
        if not self.config.causal_condition:
            raise ValueError("this DiT does not modulate the condition at t = 0 (causal_condition off): no cache")
        dt = dtype or txt.dtype
        prefix, layout, key_valid = self._prefix(txt, image_slots, ref_latents, txt_mask, dt, txt.device)
        cache = PrefixCache(key_valid=key_valid, cursor=layout.cursor, batch=txt.shape[0], device=cache_device)
        cache.prefix_len = layout.prefix_len
        ctx = Context(
            layout.segments, key_valid, cache, True, attention_fn or attention, len(self.transformer_blocks) - 1
        )
        self._run(None, prefix, ctx, dt)
        return cache

    def forward(
        self,
        img: torch.Tensor,
        timestep: torch.Tensor,
        txt: torch.Tensor | None = None,
        image_slots: torch.Tensor | None = None,
        ref_latents: list[torch.Tensor] | None = None,
        txt_mask: torch.Tensor | None = None,
        cache: PrefixCache | None = None,
        attention_fn: Callable | None = None,
    ) -> torch.Tensor:
        """Velocity [B, 64, H, W] of the target latent img [B, 64, H, W] at sigma `timestep` [B] (or scalar).

        Either the condition (txt, image_slots, ref_latents, txt_mask as for `prefill`) or `cache`, a
        PrefixCache of it from `prefill`, never both. attention_fn replaces `attention.attention`."""
        cfg, dt = self.config, img.dtype
        b, (hh, ww), device = img.shape[0], img.shape[-2:], img.device
        if cache is not None:
            if any(a is not None for a in (txt, image_slots, ref_latents, txt_mask)):
                raise ValueError("pass the condition or its prefix cache, not both")
            if cache.batch not in (1, b) or len(cache.keys) != len(self.transformer_blocks):
                raise ValueError(
                    f"the prefix cache ({cache.batch} rows, {len(cache.keys)} blocks) does not fit a batch of {b} "
                    f"on this {len(self.transformer_blocks)}-block DiT"
                )
        elif txt is None:
            raise ValueError("the DiT needs a condition: txt (with image_slots / ref_latents) or a prefix cache")
        elif txt.shape[0] not in (1, b):
            raise ValueError(f"condition of {txt.shape[0]} rows for a batch of {b} latents")
        if img.dim() != 4 or img.shape[1] != cfg.in_channels:
            raise ValueError(f"latent of shape {list(img.shape)}; expected [B, {cfg.in_channels}, H, W]")
        sigma = torch.as_tensor(timestep, device=device).float().reshape(-1).expand(b)
        temb = self._temb(sigma, dt)  # [B, D]
        attend = attention_fn or attention
        if cache is None:
            prefix, layout, key_valid = self._prefix(txt, image_slots, ref_latents, txt_mask, dt, device)
            if not cfg.causal_condition:  # the prefix modulated by each row's own timestep
                prefix.h, prefix.mod = prefix.h.expand(b, -1, -1), self._mods(temb)
            cursor, segments = layout.cursor, layout.segments
        else:
            prefix, key_valid, cursor, segments = None, cache.key_valid, cache.cursor, ()
        rot = rope.rope_table(target_positions(cursor, hh, ww, device), cfg.rope_axes, cfg.rope_theta)
        x = self.img_in(img.flatten(2).transpose(1, 2))  # [B, H*W, D], row-major tokens
        target = Stream(x.to(self._stream_dtype(dt)), rot, self._mods(temb))
        ctx = Context(segments, key_valid, cache, False, attend, len(self.transformer_blocks) - 1)
        self._run(target, prefix, ctx, dt)
        out = self.proj_out(self.norm_out(target.h, temb))  # [B, H*W, 64]
        return out.transpose(1, 2).reshape(b, -1, hh, ww).to(img.dtype)


def load_dit21(path: str | os.PathLike, *, mmap: bool = False, **sizes) -> DiT21:
    """Load a Qwen-Image-2.1 DiT from a Comfy-Org single file (bf16, comfy_quant such as int8_convrot), a
    GGUF file, a diffusers `transformer/` folder or a repo folder. Built on the meta device and filled by
    assignment (weights stay in their stored form). Sizes: `sizes` (DiT21Config fields), then config.json
    or the file's `config` metadata, then the shapes. A v1 Qwen-Image file is refused naming `load_dit`."""
    unknown = sorted(set(sizes) - set(DiT21Config.__dataclass_fields__))
    if unknown:
        raise TypeError(f"load_dit21: unknown size {', '.join(unknown)}; expected DiT21Config fields")
    w = dit21_format.read_dit21(path, mmap=mmap, overrides={k: v for k, v in sizes.items() if v is not None})
    try:
        cfg = DiT21Config(**w.config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{w.path}: inconsistent Qwen-Image-2.1 DiT sizes ({e})") from None
    with torch.device("meta"):
        model = DiT21(cfg)
    assign_weights(model, w.tensors, w.scales, w.path, "Qwen-Image-2.1 DiT", w.packed)
    model.storage, model.path = w.storage, w.path
    return model.requires_grad_(False).eval()
