"""The Qwen-Image VAE as a 2D image network: images [B, 3, H, W] in [-1, 1] <-> latents [B, 16, H/8, W/8].

The checkpoint is Wan 2.1's causal 3D video VAE (fine-tuned). For a single frame every causal 3D conv
only meets its last temporal tap and the temporal resamplers never run (facts sheet §2.3), so this file
builds the same network from 2D convolutions; `formats/vae.py` slices the 5D weights at load time.
Module names are the diffusers (`AutoencoderKLQwenImage`) checkpoint names.

Encoder: conv_in -> down_blocks (residual blocks, stride-2 downsamplers) -> mid_block (res, attention,
res) -> RMS norm, SiLU -> conv_out (mean ‖ log-variance) -> quant_conv.
Decoder: post_quant_conv -> conv_in -> mid_block -> up_blocks (residual blocks, nearest x2 + conv,
computed as four 2x2 sub-pixel convs) -> RMS norm, SiLU -> conv_out.

Lean by construction: 2D convs (a third of the 3D FLOPs and weights), channels-last activations,
in-place norms/activations/residual adds, and no 4x-sized upsampled tensors.

`ImageVAE.encode` returns normalised latents ((z - mean) / std, what the DiT sees) and `decode` takes
them; `normalize`/`denormalize` are the one place where raw and normalised latents convert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import progress
from .attention import attention
from .vae_tiling import Tiling, choose_tiling, run_tiled

__all__ = ["VAEConfig", "ImageVAE", "Tiling", "latent_preview"]

HALF = (torch.float16, torch.bfloat16)

# fmt: off
# per-channel statistics of raw latents (diffusers' vae/config.json = ComfyUI's latent_formats.Wan21)
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
# cheap previews: normalised latent channel c -> (R, G, B) in [-1, 1], plus a bias (ComfyUI's Wan21 factors)
LATENT_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861),
)
LATENT_RGB_BIAS = (-0.1835, -0.0868, -0.3360)
# fmt: on


class StageSizes:
    """What a VAE config (v1's or 2.1's) checks and derives of its dim_mult, temporal_downsample, z_dim and
    latent statistics."""

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temporal_downsample needs one entry per downsampling stage")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/std need {self.z_dim} values")

    @property
    def scale(self) -> int:
        """Pixels per latent along each axis (2 per downsampling stage: 8 for v1, 16 for 2.1)."""
        return 2 ** (len(self.dim_mult) - 1)


@dataclass(frozen=True)
class VAEConfig(StageSizes):
    base_dim: int = 96  # channels of the full-resolution stage
    z_dim: int = 16  # latent channels (the encoder emits 2 * z_dim: mean and log-variance)
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)  # stage widths / base_dim: 96, 192, 384, 384
    num_res_blocks: int = 2  # residual blocks per encoder stage; the decoder has one more per stage
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # video only: which stages carry a time_conv
    image_channels: int = 3  # 3 (RGB); 4 for Qwen-Image-Layered's RGBA VAE
    latents_mean: tuple[float, ...] = LATENTS_MEAN  # raw latent mean per channel
    latents_std: tuple[float, ...] = LATENTS_STD  # raw latent std per channel


# --- layers ---------------------------------------------------------------------------------------


class Conv2d(nn.Conv2d):
    """nn.Conv2d whose weights follow the input's dtype and device (a no-op when they already match)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(device=x.device, dtype=x.dtype)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.conv2d(x, w, b, self.stride, self.padding)


class RMSNorm(nn.Module):
    """Wan's "RMS_norm": L2-normalise over channels (eps 1e-12), times sqrt(C) and a per-channel gain.

    Half-precision inputs are normalised in float32 (as diffusers; ComfyUI stays in the input dtype).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        gain = self.gamma.to(device=x.device, dtype=x.dtype) * self.scale
        if x.dtype in HALF:
            y = F.normalize(x.float(), dim=1)
            y = x.copy_(y) if inplace else y.to(x.dtype)
        else:
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12)  # [B, 1, H, W]
            y = x.div_(norm) if inplace else x / norm
        return y.mul_(gain)


class ResidualBlock(nn.Module):
    """x -> shortcut(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))); 1x1 shortcut when widths differ."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = RMSNorm(cin)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.norm2 = RMSNorm(cout)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        y = self.conv1(F.silu(self.norm1(x), inplace=True))
        y = self.conv2(F.silu(self.norm2(y, inplace=True), inplace=True))
        return y.add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W positions (scale 1/sqrt(C)), with a residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = Conv2d(dim, 3 * dim, 1)
        self.proj = Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2)  # [B, HW, 3C]
        q, k, v = qkv[:, None].chunk(3, dim=-1)  # [B, 1, HW, C] each
        y = attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return self.proj(y).add_(x)


class MidBlock(nn.Module):
    """Residual block, attention, residual block."""

    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


def upsample2x_conv3x3(x: torch.Tensor, conv: Conv2d) -> torch.Tensor:
    """conv (3x3, padding 1) of the nearest x2 upsampling of x, without building the upsampled tensor.

    Output row 2i + a of that conv reads upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. input rows
    (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1 (the zero padding maps to zero padding). Each of
    the four output phases (a, b) is therefore a 2x2 conv of x whose taps are sums of the 3x3 taps:
    4 instead of 9 multiply-adds per output and no 4x-sized intermediate.
    """
    w = conv.weight.to(device=x.device, dtype=torch.float32)  # [O, I, 3, 3]; taps are summed in float32
    bias = None if conv.bias is None else conv.bias.to(device=x.device, dtype=x.dtype)
    rows = [
        torch.stack((w[:, :, 0], w[:, :, 1] + w[:, :, 2]), 2),
        torch.stack((w[:, :, 0] + w[:, :, 1], w[:, :, 2]), 2),
    ]
    b, _, h, wd = x.shape
    xp = F.pad(x, (1, 1, 1, 1))  # [B, I, H + 2, W + 2]
    out = x.new_empty(b, w.shape[0], 2 * h, 2 * wd).contiguous(memory_format=torch.channels_last)
    for a, r in enumerate(rows):  # r: [O, I, 2, 3]
        cols = (torch.stack((r[..., 0], r[..., 1] + r[..., 2]), 3), torch.stack((r[..., 0] + r[..., 1], r[..., 2]), 3))
        for c, k in enumerate(cols):  # k: [O, I, 2, 2], the kernel of phase (a, c)
            k = k.to(x.dtype).contiguous(memory_format=torch.channels_last)
            out[:, :, a::2, c::2] = F.conv2d(xp[:, :, a : a + h + 1, c : c + wd + 1], k, bias)
    return out


class Resample(nn.Module):
    """Downsample: zero-pad right and bottom by 1, 3x3 conv stride 2 (H -> H/2).
    Upsample: nearest x2, then a 3x3 conv that halves the channels (computed by upsample2x_conv3x3)."""

    def __init__(self, dim: int, up: bool):
        super().__init__()
        self.up = up
        if up:  # the Sequential keeps the checkpoint's key names (resample.1.*)
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest"), Conv2d(dim, dim // 2, 3, padding=1)
            )
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), Conv2d(dim, dim, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample2x_conv3x3(x, self.resample[1]) if self.up else self.resample(x)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_blocks: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(cin if j == 0 else cout, cout) for j in range(num_blocks)])
        self.upsamplers = nn.ModuleList([Resample(cout, up=True)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


def run_stages(x: torch.Tensor, stages: nn.ModuleList, check: Callable[[], None] | None) -> torch.Tensor:
    """x through each stage in turn (an encoder's or decoder's blocks); `check` called before each (raise from
    it to stop: a host's interrupt check), and a progress step reported after each."""
    for i, stage in enumerate(stages):
        if check is not None:
            check()
        x = stage(x)
        progress.step(check, i + 1, len(stages))
    return x


class EncoderStack(nn.Module):
    """conv_in, the down_blocks (run_stages), mid_block, then norm_out, SiLU and conv_out; subclasses build them."""

    def forward(self, x: torch.Tensor, check: Callable[[], None] | None = None) -> torch.Tensor:
        x = self.mid_block(run_stages(self.conv_in(x), self.down_blocks, check))
        return self.conv_out(F.silu(self.norm_out(x, inplace=True), inplace=True))


class DecoderStack(nn.Module):
    """conv_in, mid_block, the up_blocks (run_stages), then norm_out, SiLU and conv_out; subclasses build them."""

    def forward(self, z: torch.Tensor, check: Callable[[], None] | None = None) -> torch.Tensor:
        x = run_stages(self.mid_block(self.conv_in(z)), self.up_blocks, check)
        return self.conv_out(F.silu(self.norm_out(x, inplace=True), inplace=True))


class Encoder(EncoderStack):
    """Images [B, 3 (4: Layered), H, W] -> [B, 96, H, W] -> ... [B, 384, H/8, W/8] -> moments [B, 32, H/8, W/8]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]  # 96, 96, 192, 384, 384
        self.conv_in = Conv2d(cfg.image_channels, dims[0], 3, padding=1)
        blocks = []
        for i in range(len(cfg.dim_mult)):
            blocks += [
                ResidualBlock(dims[i] if j == 0 else dims[i + 1], dims[i + 1]) for j in range(cfg.num_res_blocks)
            ]
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Resample(dims[i + 1], up=False))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = Conv2d(dims[-1], 2 * cfg.z_dim, 3, padding=1)


class Decoder(DecoderStack):
    """Latents [B, 16, h, w] -> [B, 384, h, w] -> ... [B, 96, 8h, 8w] -> images [B, 3 (4: Layered), 8h, 8w]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]  # 384, 384, 384, 192, 96
        stages = len(cfg.dim_mult)
        self.conv_in = Conv2d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = nn.ModuleList(
            UpBlock(dims[i] if i == 0 else dims[i] // 2, dims[i + 1], cfg.num_res_blocks + 1, upsample=i < stages - 1)
            for i in range(stages)
        )
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = Conv2d(dims[-1], cfg.image_channels, 3, padding=1)


# --- the VAE --------------------------------------------------------------------------------------


class ImageVAE(nn.Module):
    """Encode and decode still images. Computes in the input's dtype and device.

    Odd sizes: an image whose height or width is not a multiple of 8 is padded on the right and bottom
    by repeating its edge pixels up to the next multiple of 8, so latent (0, 0) stays aligned with
    pixel (0, 0) (no shift, unlike a centre crop) and no pixel is dropped; the latents are
    ceil(H/8) x ceil(W/8), and decoding them gives 8*ceil(H/8) x 8*ceil(W/8) pixels, whose top-left
    H x W are the image (crop with `[..., :H, :W]`). The DiT needs latents in multiples of 2: sizing to
    multiples of 16 is the pipeline's choice, not the VAE's.

    Tiling (`tile`): None or "auto" (default) splits the work into blended tiles only when the measured
    working-memory estimate exceeds `budget` bytes (default: a share of the device's free memory);
    False never tiles; `Tiling(size, overlap)` forces tiles of `size` pixels overlapping by `overlap`.
    """

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = Conv2d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.post_quant_conv = Conv2d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)

    @staticmethod
    def _convert(x: torch.Tensor, cfg: VAEConfig, forward: bool) -> torch.Tensor:
        """The one place raw and normalised latents convert: z_n = (z - mean) / std per channel, and back."""
        mean = torch.tensor(cfg.latents_mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std if forward else x * std + mean

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the normalised latents the DiT works in: (z - mean) / std per channel."""
        return self._convert(raw, self.cfg, forward=True)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> raw VAE latents: z * std + mean per channel."""
        return self._convert(z, self.cfg, forward=False)

    def moments(self, images: torch.Tensor, check: Callable[[], None] | None = None) -> torch.Tensor:
        """Posterior parameters of images (multiples of 8): [B, 2*z_dim, H/8, W/8] = mean ‖ log-variance."""
        return self.quant_conv(self.encoder(images, check))

    def decode_raw(self, raw: torch.Tensor, check: Callable[[], None] | None = None) -> torch.Tensor:
        """Raw latents -> images, not clamped."""
        return self.decoder(self.post_quant_conv(raw), check)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
               tile: Tiling | str | bool | None = None, budget: int | None = None,
               check: Callable[[], None] | None = None) -> torch.Tensor:  # fmt: skip
        """Images [B, C, H, W] in [-1, 1] -> normalised latents [B, 16, ceil(H/8), ceil(W/8)].

        The posterior mean by default (edit references); `sample=True` draws mean + std * noise with
        `generator` (img2img; log-variance clamped to [-30, 20] as diffusers). check: called between tiles
        and encoder stages; raise from it to stop (a host's interrupt check).
        """
        b, c, h, w = images.shape
        if c != self.cfg.image_channels:
            raise ValueError(f"this VAE takes {self.cfg.image_channels}-channel images, got {c} channels")
        s = self.cfg.scale
        pad_h, pad_w = -h % s, -w % s
        if pad_h or pad_w:  # replicate the last row / column (see the class docstring)
            images = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
        images = images.contiguous(memory_format=torch.channels_last)  # the layout the weights are stored in
        plan = choose_tiling(tile, "encode", images, self.cfg, budget)
        if plan is None:
            moments = self.moments(images, check)
        else:
            fn = lambda tile: self.moments(tile, progress.silent(check))  # tiles are the units
            moments = run_tiled(fn, images, plan.size // s, plan.overlap // s, s, 1, check)
        mean, logvar = moments.chunk(2, dim=1)
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                                device=generator.device if generator is not None else mean.device)  # fmt: skip
            mean = mean + std * noise.to(mean.device)
        return self.normalize(mean).contiguous()

    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        tile: Tiling | str | bool | None = None,
        budget: int | None = None,
        check: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Normalised latents [B, 16, h, w] -> images [B, C, 8h, 8w], clamped to [-1, 1] (tiled or not).

        check: called between tiles and decoder stages; raise from it to stop (a host's interrupt check)."""
        raw = self.denormalize(latents).contiguous(memory_format=torch.channels_last)
        plan = choose_tiling(tile, "decode", raw, self.cfg, budget)
        if plan is None:
            images = self.decode_raw(raw, check)
        else:
            s = self.cfg.scale
            fn = lambda tile: self.decode_raw(tile, progress.silent(check))  # tiles are the units
            images = run_tiled(fn, raw, plan.size // s, plan.overlap // s, 1, s, check)
        return images.clamp_(-1.0, 1.0).contiguous()


def latent_preview(latents: torch.Tensor) -> torch.Tensor:
    """A cheap RGB preview of normalised latents [B, 16, h, w] -> [B, 3, h, w] in [-1, 1] (one linear map)."""
    factors = torch.tensor(LATENT_RGB_FACTORS, device=latents.device, dtype=latents.dtype)  # [16, 3]
    bias = torch.tensor(LATENT_RGB_BIAS, device=latents.device, dtype=latents.dtype)
    rgb = torch.einsum("bchw,cr->brhw", latents, factors) + bias.view(1, 3, 1, 1)
    return rgb.clamp(-1.0, 1.0)


def normalize_latents(raw: torch.Tensor, cfg: VAEConfig = VAEConfig()) -> torch.Tensor:
    """Raw latents [B, 16, h, w] -> normalised, with a config's statistics (default: Qwen-Image's)."""
    return ImageVAE._convert(raw, cfg, forward=True)


def denormalize_latents(z: torch.Tensor, cfg: VAEConfig = VAEConfig()) -> torch.Tensor:
    """Normalised latents -> raw latents, with a config's statistics (default: Qwen-Image's)."""
    return ImageVAE._convert(z, cfg, forward=False)
