"""The Qwen-Image diffusion transformer: a 20B double-stream MMDiT with MS-RoPE, predicting flow velocity.

Text tokens and image patch tokens keep separate weights (AdaLN modulation, QKV, MLP) in every block and
meet in one joint attention over the sequence [text | target image | reference images]. The model maps a
noisy latent at noise level sigma to the velocity v = noise - x0 (flow matching, Esser et al. 2024,
arXiv 2403.03206). Module names equal the checkpoint keys, so weights load by assignment.

Numerics follow diffusers' `QwenImageTransformer2DModel` (the official code); where ComfyUI 0.3.75
differs (odd token grids, text RoPE start with references) diffusers wins. Linear layers compute in the
compute dtype whatever their storage dtype (float8 included). RMSNorm and RoPE compute in float32 (`norms.using`:
the QK norms in the compute dtype, an opt-in). In float16 the residual streams are kept in float32 and sublayer
outputs are clamped to the float16 range, because the real model's activations overflow float16. The timestep
stays float32 (diffusers rounds it to the model dtype first; the same in float32). Odd latent sizes are padded
circularly to even ones (ComfyUI's choice; diffusers refuses them) and the output is cropped back.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import layer_tokens, rope
from .attention import attention, text_keys
from .checkpoint import CheckpointError
from .formats import dit as dit_format
from .formats.common import assign_weights
from .norms import RMSNorm
from .ops import Linear

# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MMDiTConfig:
    """Sizes of the DiT; the defaults are the 20B Qwen-Image model (20,430,401,088 parameters)."""

    num_layers: int = 60  # double-stream blocks (there are no single-stream blocks)
    num_heads: int = 24  # attention heads; hidden size = num_heads * head_dim = 3072
    head_dim: int = 128  # channels per head (QK RMSNorm is over these)
    mlp_dim: int = 12288  # MLP hidden size, 4 x 3072, GELU-tanh
    text_dim: int = 3584  # text-encoder hidden size (Qwen2.5-VL-7B)
    in_channels: int = 64  # 16 latent channels x 2 x 2 patch
    out_channels: int = 16  # latent channels predicted per pixel
    patch_size: int = 2  # latent pixels per token side
    rope_axes: tuple[int, int, int] = (16, 56, 56)  # head channels for frame / row / column, sum = head_dim
    rope_theta: float = 10000.0  # RoPE base
    eps: float = 1e-6  # LayerNorm and RMSNorm epsilon
    timestep_dim: int = 256  # sinusoidal timestep features (cosines first)
    zero_cond_t: bool = False  # Edit-2511: reference tokens modulated as if t = 0
    layer3d_rope: bool = False  # Qwen-Image-Layered: RoPE frame axis = layer index, input image at -1
    additional_t_cond: bool = False  # Qwen-Image-Layered: a learnt 2-entry embedding added to the timestep's

    def __post_init__(self):
        if sum(self.rope_axes) != self.head_dim or any(a % 2 for a in self.rope_axes):
            raise ValueError(f"rope_axes {self.rope_axes} must be even and sum to head_dim {self.head_dim}")
        if self.in_channels != self.out_channels * self.patch_size**2:
            raise ValueError(f"in_channels {self.in_channels} != out_channels x patch^2 for this DiT")

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim


def config_from_shapes(shapes: dict[str, tuple[int, ...]], *, where="the weights", **overrides) -> MMDiTConfig:
    """The configuration from the (prefix-free) parameter shapes and `overrides` (MMDiTConfig fields, e.g. from
    config.json), which win; sizes the shapes cannot tell (the RoPE axes of heads other than the real model's
    128 channels) must be among the overrides, else CheckpointError (see `formats.dit.infer_config`)."""
    known = {k: v for k, v in overrides.items() if v is not None}
    return MMDiTConfig(**dit_format.infer_config(shapes, known, where))


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------

F16_MAX = 65504.0


def fp16_safe(x: torch.Tensor) -> torch.Tensor:
    """Clamp a float16 tensor into the finite range (inf -> +-65504); other dtypes pass through."""
    return x.clamp(-F16_MAX, F16_MAX) if x.dtype == torch.float16 else x


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis without affine parameters."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos | sin] features [B, dim] of 1000 * t (t = sigma in [0, 1]), max period 10000, float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * (t.float()[:, None] * freqs[None])  # [B, half]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim_in: int, hidden: int):
        super().__init__()
        self.linear_1 = Linear(dim_in, hidden)
        self.linear_2 = Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """Holds `timestep_embedder` and, for Qwen-Image-Layered, `addition_t_embedding` (row 0: RGBA layers)."""

    def __init__(self, dim_in: int, hidden: int, additional: bool = False):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim_in, hidden)
        if additional:
            self.addition_t_embedding = nn.Embedding(2, hidden)


class GeluProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class MLP(nn.Module):
    """Linear -> GELU(tanh) -> Linear; `net.1` is an empty slot where the reference has a dropout."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.ModuleList([GeluProj(dim, hidden), nn.Identity(), Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](fp16_safe(self.net[0](x)))


class JointAttention(nn.Module):
    """Attention over [text | image] with per-stream QKV, per-head QK RMSNorm, then MS-RoPE."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        d, self.head_dim = cfg.hidden, cfg.head_dim
        self.to_q, self.to_k, self.to_v = Linear(d, d), Linear(d, d), Linear(d, d)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = Linear(d, d), Linear(d, d), Linear(d, d)
        self.norm_q, self.norm_k = RMSNorm(cfg.head_dim, cfg.eps), RMSNorm(cfg.head_dim, cfg.eps)
        self.norm_added_q, self.norm_added_k = RMSNorm(cfg.head_dim, cfg.eps), RMSNorm(cfg.head_dim, cfg.eps)
        self.to_out = nn.ModuleList([Linear(d, d), nn.Identity()])  # `to_out.1` is the reference's dropout
        self.to_add_out = Linear(d, d)

    def forward(self, img, txt, pe, key_mask, attend=attention):
        def heads(t):  # [B, N, H*hd] -> [B, N, H, hd]
            return t.unflatten(-1, (-1, self.head_dim))

        q = torch.cat([self.norm_added_q(heads(self.add_q_proj(txt))), self.norm_q(heads(self.to_q(img)))], dim=1)
        k = torch.cat([self.norm_added_k(heads(self.add_k_proj(txt))), self.norm_k(heads(self.to_k(img)))], dim=1)
        v = torch.cat([heads(self.add_v_proj(txt)), heads(self.to_v(img))], dim=1)
        q, k = rope.apply_rope(q, pe), rope.apply_rope(k, pe)  # [B, L + N, H, hd]
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_mask)  # [B, H, L + N, hd]
        out = out.transpose(1, 2).flatten(2)  # [B, L + N, H*hd]
        n_txt = txt.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


def modulation(temb_mod: torch.Tensor, batch: int, n_target: int | None, n_tokens: int) -> list[torch.Tensor]:
    """Split an AdaLN output [B or 2B, 6D] into shift1, scale1, gate1, shift2, scale2, gate2 ([B, 1|N, D]).

    With `n_target` (zero_cond_t) the first B rows modulate the target's tokens and the last B rows
    (computed at t = 0) the reference tokens that follow them.
    """
    m = temb_mod[:, None, :]  # [B or 2B, 1, 6D]
    if n_target is not None:
        m = torch.cat([m[:batch].expand(-1, n_target, -1), m[batch:].expand(-1, n_tokens - n_target, -1)], dim=1)
    return list(m.chunk(6, dim=-1))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation x * (1 + scale) + shift."""
    return torch.addcmul(shift, x, 1 + scale)


def gated(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """Gated residual x + gate * y, in the residual stream's dtype (float32 when computing in float16).

    fused: one addcmul (the MLP residual, as ComfyUI), else a product then a sum (the attention residual, as
    ComfyUI and diffusers): the same value up to rounding, kept apart so float32 results match ComfyUI's bits."""
    gate, y = gate.to(x.dtype), fp16_safe(y).to(x.dtype)
    return torch.addcmul(x, gate, y) if fused else x + gate * y


class DoubleStreamBlock(nn.Module):
    """One MMDiT block: AdaLN-modulated joint attention then MLP, each with a gated residual, per stream."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.img_mod = nn.Sequential(nn.SiLU(), Linear(cfg.hidden, 6 * cfg.hidden))
        self.txt_mod = nn.Sequential(nn.SiLU(), Linear(cfg.hidden, 6 * cfg.hidden))
        self.attn = JointAttention(cfg)
        self.img_mlp = MLP(cfg.hidden, cfg.mlp_dim)
        self.txt_mlp = MLP(cfg.hidden, cfg.mlp_dim)

    def forward(self, img, txt, temb, pe, key_mask, n_target, attend=attention, mod=None):
        """img [B, N, D] and txt [B, L, D] residual streams; temb [B or 2B, D] in the compute dtype;
        attend: the attention function (`attention.attention`'s signature); mod: precomputed (img_mod(temb),
        txt_mod(temb[:B])) outputs (`modulation.StepModulation.block`), else computed here."""
        dt, b = temb.dtype, txt.shape[0]
        img_m, txt_m = mod if mod is not None else (self.img_mod(temb), self.txt_mod(temb[:b]))
        ish1, isc1, ig1, ish2, isc2, ig2 = modulation(img_m, b, n_target, img.shape[1])
        tsh1, tsc1, tg1, tsh2, tsc2, tg2 = modulation(txt_m, b, None, txt.shape[1])

        img_a, txt_a = self.attn(
            modulate(layer_norm(img, self.eps).to(dt), ish1, isc1),
            modulate(layer_norm(txt, self.eps).to(dt), tsh1, tsc1),
            pe,
            key_mask,
            attend,
        )
        img, txt = gated(img, ig1, img_a, fused=False), gated(txt, tg1, txt_a, fused=False)
        img = gated(img, ig2, self.img_mlp(modulate(layer_norm(img, self.eps).to(dt), ish2, isc2)))
        txt = gated(txt, tg2, self.txt_mlp(modulate(layer_norm(txt, self.eps).to(dt), tsh2, tsc2)))
        return img, txt


class FinalLayer(nn.Module):
    """AdaLN on the image stream (note: scale first, shift second, unlike the blocks)."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = Linear(hidden, 2 * hidden)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, mod: torch.Tensor | None = None) -> torch.Tensor:
        scale, shift = (self.linear(F.silu(temb)) if mod is None else mod).chunk(2, dim=-1)  # mod: precomputed
        return modulate(layer_norm(x, self.eps).to(temb.dtype), shift[:, None], scale[:, None])


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------

# block_hook(i, run, img, txt, temb, pe) -> (img, txt), with run(img, txt, temb, pe) -> (img, txt)
BlockHook = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def patchify(x: torch.Tensor, p: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Latent [B, C, H, W] -> tokens [B, h*w, C*p*p] (row-major, feature = c*p*p + dy*p + dx), grid (h, w).

    Odd H or W is padded circularly up to a multiple of p (ComfyUI's choice; diffusers refuses such
    sizes); the caller crops the padding off the output.
    """
    ph, pw = -x.shape[-2] % p, -x.shape[-1] % p
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="circular")
    b, c, hh, ww = x.shape
    h, w = hh // p, ww // p
    x = x.view(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, p, p]
    return x.reshape(b, h * w, c * p * p), (h, w)


def unpatchify(x: torch.Tensor, grid: tuple[int, int], p: int, size: tuple[int, int]) -> torch.Tensor:
    """Tokens [B, h*w, C*p*p] -> latent [B, C, H, W], cropped to `size` (undoing patchify's padding)."""
    (h, w), b = grid, x.shape[0]
    x = x.view(b, h, w, -1, p, p).permute(0, 3, 1, 4, 2, 5)  # [B, C, h, p, w, p]
    return x.reshape(b, -1, h * p, w * p)[:, :, : size[0], : size[1]]


class MMDiT(nn.Module):
    """Qwen-Image's MMDiT: `model(img, sigma, txt, ...)` -> velocity, all patching done inside."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        cfg = self.config = config
        self.zero_cond_t = config.zero_cond_t  # default for forward(); the caller may override per call
        self.storage, self.path = "", None  # set by load_dit: storage format and file
        self.img_in = Linear(cfg.in_channels, cfg.hidden)
        self.txt_norm = RMSNorm(cfg.text_dim, cfg.eps)
        self.txt_in = Linear(cfg.text_dim, cfg.hidden)
        self.time_text_embed = TimeTextEmbed(cfg.timestep_dim, cfg.hidden, cfg.additional_t_cond)
        self.transformer_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_out = FinalLayer(cfg.hidden, cfg.eps)
        self.proj_out = Linear(cfg.hidden, cfg.in_channels)

    def forward(
        self,
        img: torch.Tensor,
        timestep: torch.Tensor,
        txt: torch.Tensor,
        txt_mask: torch.Tensor | None = None,
        ref_latents: list[torch.Tensor] | None = None,
        zero_cond_t: bool | None = None,
        positions: str = "official",
        ref_layout: str = "index",
        block_hook: BlockHook | None = None,
        attention_fn: Callable | None = None,
        txt_lengths: Sequence[int] | None = None,
        step_mod=None,
        t_cond: int = 0,
    ) -> torch.Tensor:
        """Velocity [B, 16, H, W] of the target latent.

        img [B, 16, H, W] normalised latent; timestep [B] (or scalar) sigma in [0, 1]; txt [B, L, text_dim];
        txt_mask [B, L] bool (True = real token) or None; ref_latents: edit references [B|1, 16, h_i, w_i],
        appended after the target at frame i + 1; zero_cond_t None = the checkpoint's setting.
        positions / ref_layout: the RoPE conventions (rope.CONVENTIONS, rope.REF_LAYOUTS). block_hook: called
        as `block_hook(i, run, img, txt, temb, pe)` in place of block i, where `run(img, txt, temb, pe)`
        runs the block; it returns (img, txt) (a host's patches and control residuals enter here).
        attention_fn: replaces `attention.attention` (a host's attention dispatch), same signature.
        txt_lengths: each row's real text tokens (host ints), instead of txt_mask (`attention.text_keys`).
        Qwen-Image-Layered: img [B, 16, F, H, W] (F = layers + 1 frames, the composite first), the input image
        as the one reference; t_cond: its additional timestep condition. step_mod: this step's precomputed
        AdaLN outputs (`modulation.StepModulation`), else computed per call.
        """
        cfg, dt, p = self.config, img.dtype, self.config.patch_size  # compute in the input latent's dtype
        b, size = img.shape[0], tuple(img.shape[-2:])
        stream_dt = torch.float32 if dt == torch.float16 else dt  # residual streams overflow float16

        frames = layer_tokens.frames(img, cfg)  # F of a layered latent [B, 16, F, H, W], else 0
        x, grid = layer_tokens.patchify_frames(img, p, patchify) if frames else patchify(img, p)
        refs = [patchify(ref.expand(b, *ref.shape[1:]), p) for ref in ref_latents or []]  # (tokens, grid) each
        tokens, grids = [x, *(r for r, _ in refs)], [grid] * max(frames, 1) + [g for _, g in refs]
        x = torch.cat(tokens, dim=1).to(dt)  # [B, N_target + N_refs, C*p*p]
        n_target, n_tokens = tokens[0].shape[1], x.shape[1]

        timestep = torch.as_tensor(timestep, device=img.device).float().reshape(-1).expand(b)
        zero_cond = (self.zero_cond_t if zero_cond_t is None else zero_cond_t) and len(grids) > 1
        if zero_cond:  # rows B..2B: the embedding of t = 0, used for the reference tokens
            timestep = torch.cat([timestep, torch.zeros_like(timestep)])
        temb = self.time_text_embed.timestep_embedder(timestep_sinusoid(timestep, cfg.timestep_dim).to(dt))
        if cfg.additional_t_cond:
            temb = temb + self.time_text_embed.addition_t_embedding.weight[t_cond].to(dt)

        txt_mask = None if txt_mask is None else txt_mask.to(img.device)
        attend, key_mask = text_keys(attention_fn or attention, b, txt.shape[1], txt_lengths, txt_mask)
        if key_mask is not None:
            key_mask = torch.cat([key_mask, key_mask.new_ones(b, n_tokens)], dim=1)
        ref_sizes = [tuple(r.shape[-2:]) for r in ref_latents or []]
        layout = "layer3d" if cfg.layer3d_rope else ref_layout
        pos = rope.joint_positions(grids, txt.shape[1], img.device, positions, layout, ref_sizes)  # [L + N, 3]
        pe = rope.rope_table(pos, cfg.rope_axes, cfg.rope_theta, rope.CONVENTIONS[positions])

        h = self.img_in(x).to(stream_dt)  # [B, N, D]
        c = self.txt_in(self.txt_norm(txt.to(dt))).to(stream_dt)  # [B, L, D]
        n_zero = n_target if zero_cond else None
        mods = [None] * len(self.transformer_blocks) if step_mod is None else step_mod.blocks(temb, b)
        for i, (block, m) in enumerate(zip(self.transformer_blocks, mods, strict=True)):
            run = lambda img_, txt_, temb_, pe_, b=block, m=m: b(img_, txt_, temb_, pe_, key_mask, n_zero, attend, m)
            h, c = run(h, c, temb, pe) if block_hook is None else block_hook(i, run, h, c, temb, pe)

        out = self.proj_out(self.norm_out(h[:, :n_target], temb[:b], step_mod and step_mod.out))  # [B, N, C*p*p]
        if frames:
            return layer_tokens.unpatchify_frames(out, grid, p, size, frames, unpatchify).to(img.dtype)
        return unpatchify(out, grid, p, size).to(img.dtype)


def load_dit(path: str | os.PathLike, zero_cond_t: bool | None = None, *, mmap: bool = False, **sizes) -> MMDiT:
    """Load a Qwen-Image DiT from a ComfyUI single file, a diffusers `transformer/` folder or a repo folder.

    Built on the meta device and filled by assignment: weights are held once, in their stored dtype (float8
    stays float8), read into process memory (`mmap=True`: zero-copy views of the mapped file instead, see
    `checkpoint`). Sizes come from `sizes` (MMDiTConfig fields, e.g. rope_axes=(16, 56, 56)), then the
    diffusers config.json, then the shapes where unambiguous; `zero_cond_t` overrides the checkpoint's setting.
    """
    unknown = sorted(set(sizes) - set(MMDiTConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"load_dit: unknown size {', '.join(unknown)}; expected MMDiTConfig fields")
    overrides = {k: v for k, v in {**sizes, "zero_cond_t": zero_cond_t}.items() if v is not None}
    w = dit_format.read_dit(path, mmap=mmap, overrides=overrides)
    try:
        cfg = MMDiTConfig(**w.config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{w.path}: inconsistent Qwen-Image DiT sizes ({e})") from None
    with torch.device("meta"):
        model = MMDiT(cfg)
    assign_weights(model, w.tensors, w.scales, w.path, "Qwen-Image DiT", w.packed)
    model.storage = w.storage
    model.path = w.path
    return model.requires_grad_(False).eval()
