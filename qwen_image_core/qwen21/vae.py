"""The Qwen-Image-2.1 VAE as a 2D image network: RGBA images [B, 4, H, W] in [-1, 1] <-> latents [B, 64, H/16, W/16].

The reference (`AutoencoderKLQwenImage21`) is the image specialisation of Wan 2.2's residual VAE: its "causal"
convolutions are already 2D, and for a single frame the temporal convolutions never run (the decoder's
`time_conv` is skipped on the first chunk, the encoder's only caches). What stays of time is the shortcut
arithmetic, reproduced here exactly for one frame:
* encoder shortcut (`avg_shortcut`, Wan's AvgDown3D): space-to-channel by 2x2 (and by 2 in time for the
  temporally downsampling stages, where the single frame is preceded by a zero frame), then the mean of each
  group of consecutive channels down to the output width;
* decoder shortcut (DupUp3D): each input channel repeated, channel-to-space by 2x2; in the temporally upsampling
  stages only the last of the two frames is kept (the reference's `first_chunk`), i.e. every other channel group.
Module names are the diffusers checkpoint names; `formats/vae21.py` reshapes the norms' gains. The residual,
attention and middle blocks and the sub-pixel upsampling conv are v1's (`qwen_image_core.vae`), unchanged, and so
are encode/decode (edge padding, tiling through `vae_tiling`, normalisation): `ImageVAE21` subclasses `ImageVAE`.

Encoder: conv_in -> 5 down blocks (2 residual blocks, stride-2 downsampler but in the last, + shortcut) ->
mid_block -> RMS norm, SiLU -> conv_out (mean || log-variance) -> quant_conv.
Decoder: post_quant_conv -> conv_in -> mid_block -> 5 up blocks (3 residual blocks, nearest x2 + conv but in
the last, + shortcut) -> RMS norm, SiLU -> conv_out. Widths: encoder 96 .. 768, decoder 1152 .. 144.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..vae import (
    Conv2d,
    DecoderStack,
    EncoderStack,
    ImageVAE,
    MidBlock,
    ResidualBlock,
    RMSNorm,
    StageSizes,
    upsample2x_conv3x3,
)
from ..vae_tiling import choose_tiling

# fmt: off
# per-channel statistics of raw latents (diffusers' AutoencoderKLQwenImage21 config defaults)
LATENTS_MEAN = (
    0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722,
    1.8873, -1.7177, -0.6510, 0.2732, 0.7562, -0.6163, -1.0277, 3.8363,
    2.0210, 0.0472, 0.9320, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464,
    -0.5236, 1.2826, 3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955,
    -0.0342, -1.0265, -0.7636, 3.0555, 0.0746, -3.0751, -0.1076, 1.7376,
    -1.0914, -1.9435, -0.2784, -1.3680, 0.4809, -0.4433, 0.3764, 0.5729,
    -2.0595, 1.0960, -1.3260, -2.0211, -5.0179, 0.5275, 4.0162, 1.8505,
    0.3026, 1.9373, 1.4937, 0.2632, 0.5547, -1.7121, -0.1562, 0.0304,
)
LATENTS_STD = (
    3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.7910,
    3.0785, 3.6500, 3.9308, 3.0904, 2.8778, 3.7675, 3.7320, 5.0756,
    3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988, 4.2489,
    3.4896, 3.8513, 3.9323, 3.4719, 3.7498, 4.2830, 3.5694, 4.2467,
    3.9037, 3.2947, 5.0770, 3.5075, 3.2700, 3.4767, 2.8063, 5.1125,
    3.5327, 4.7833, 3.1286, 4.1819, 3.8527, 3.8312, 3.5605, 4.3875,
    3.9624, 4.0168, 3.5643, 4.0550, 5.5614, 4.2963, 4.4080, 3.4959,
    3.8747, 3.7608, 3.5735, 3.1490, 3.7662, 3.6746, 3.4563, 3.8161,
)
# fmt: on


@dataclass(frozen=True)
class VAE21Config(StageSizes):
    encoder_dim: int = 96  # channels of the encoder's full-resolution stage
    decoder_dim: int = 144  # channels of the decoder's full-resolution stage
    z_dim: int = 64  # latent channels (the encoder emits 2 * z_dim: mean and log-variance)
    dim_mult: tuple[int, ...] = (1, 2, 4, 8, 8)  # stage widths / base: encoder 96 .. 768, decoder 144 .. 1152
    num_res_blocks: int = 2  # residual blocks per encoder stage; the decoder has one more per stage
    temporal_downsample: tuple[bool, ...] = (False, True, True, True)  # stages whose shortcut also folds time
    image_channels: int = 4  # RGBA
    latents_mean: tuple[float, ...] = LATENTS_MEAN  # raw latent mean per channel
    latents_std: tuple[float, ...] = LATENTS_STD  # raw latent std per channel


def space_to_channels_mean(x: torch.Tensor, cout: int, time: int, space: int) -> torch.Tensor:
    """The encoder shortcut for one frame: [B, C, H, W] -> [B, cout, H/space, W/space] (see the module docstring)."""
    b, c, h, w = x.shape
    frames = torch.stack([torch.zeros_like(x)] * (time - 1) + [x], 2)  # [B, C, time, H, W], zero frames first
    y = frames.view(b, c, time, h // space, space, w // space, space).permute(0, 1, 2, 4, 6, 3, 5)
    y = y.reshape(b, cout, c * time * space * space // cout, h // space, w // space)  # channel groups
    return y.mean(2)


def channels_to_space(x: torch.Tensor, cout: int, time: int, space: int = 2) -> torch.Tensor:
    """The decoder shortcut for the first frame: [B, C, h, w] -> [B, cout, space*h, space*w]."""
    b, c, h, w = x.shape
    repeats = cout * time * space * space // c
    # output (o, dy, dx) reads repeated channel o*time*s*s + (time-1)*s*s + dy*s + dx, i.e. input (that // repeats)
    o = torch.arange(cout)[:, None] * time * space * space + (time - 1) * space * space
    source = (o + torch.arange(space * space)[None]) // repeats  # [cout, s*s]
    y = x[:, source.flatten().to(x.device)].view(b, cout, space, space, h, w)
    return y.permute(0, 1, 4, 2, 5, 3).reshape(b, cout, h * space, w * space)


class Resample21(nn.Module):
    """Downsample (zero-pad right/bottom, 3x3 conv stride 2) or upsample (nearest x2 + 3x3 conv, computed as
    sub-pixel convs), keeping the width. (The file's temporal `time_conv` of these layers never runs on one frame:
    `formats/vae21.py` checks it is there and drops it.)"""

    def __init__(self, dim: int, up: bool):
        super().__init__()
        self.up = up
        if up:  # the Sequentials keep the checkpoint's key names (resample.1.*)
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), Conv2d(dim, dim, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), Conv2d(dim, dim, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample2x_conv3x3(x, self.resample[1]) if self.up else self.resample(x)


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.time, self.space, self.cout = 2 if temporal else 1, 2 if down else 1, cout
        self.resnets = nn.ModuleList(ResidualBlock(cin if j == 0 else cout, cout) for j in range(num_blocks))
        self.downsampler = Resample21(cout, up=False) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = space_to_channels_mean(x, self.cout, self.time, self.space)
        for block in self.resnets:
            x = block(x)
        x = x if self.downsampler is None else self.downsampler(x)
        return x.add_(shortcut)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.time, self.up, self.cout = 2 if temporal else 1, up, cout
        self.resnets = nn.ModuleList(ResidualBlock(cin if j == 0 else cout, cout) for j in range(num_blocks))
        self.upsampler = Resample21(cout, up=True) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = channels_to_space(x, self.cout, self.time) if self.up else None
        for block in self.resnets:
            x = block(x)
        if self.upsampler is None:
            return x
        return self.upsampler(x).add_(shortcut)


class Encoder21(EncoderStack):
    """Images [B, 4, H, W] -> [B, 96, H, W] -> ... [B, 768, H/16, W/16] -> moments [B, 128, H/16, W/16]."""

    def __init__(self, cfg: VAE21Config):
        super().__init__()
        dims = [cfg.encoder_dim * m for m in (1, *cfg.dim_mult)]  # 96, 96, 192, 384, 768, 768
        last = len(cfg.dim_mult) - 1
        self.conv_in = Conv2d(cfg.image_channels, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(dims[i], dims[i + 1], cfg.num_res_blocks, i < last and cfg.temporal_downsample[i], i < last)
            for i in range(len(cfg.dim_mult))
        )
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = Conv2d(dims[-1], 2 * cfg.z_dim, 3, padding=1)


class Decoder21(DecoderStack):
    """Latents [B, 64, h, w] -> [B, 1152, h, w] -> ... [B, 144, 16h, 16w] -> images [B, 4, 16h, 16w]."""

    def __init__(self, cfg: VAE21Config):
        super().__init__()
        mult = (cfg.dim_mult[-1], *cfg.dim_mult[::-1])
        dims = [cfg.decoder_dim * m for m in mult]  # 1152, 1152, 1152, 576, 288, 144
        last = len(cfg.dim_mult) - 1
        temporal = cfg.temporal_downsample[::-1]
        self.conv_in = Conv2d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = nn.ModuleList(
            UpBlock(dims[i], dims[i + 1], cfg.num_res_blocks + 1, i < last and temporal[i], i < last)
            for i in range(len(cfg.dim_mult))
        )
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = Conv2d(dims[-1], cfg.image_channels, 3, padding=1)


# The width `vae_tiling`'s working-memory estimate (v1's bytes per pixel at width 96) is scaled by, per direction,
# for the real 2.1 VAE. Measured like bench_vae.py --calibrate (peak RSS minus RSS before the run, untiled, float32,
# CPU, one image at 256² and 512²): encode 123 / 302 MB (slope 228 B per pixel per byte of dtype: v1's 300 at width
# 96 covers it), decode 195 / 1029 MB (slope 1060: v1's 420 scaled to width 256 gives 1120).
TILING_WIDTH = {"encode": 96, "decode": 256}


@dataclass(frozen=True)
class _TilingView:
    """What `vae_tiling.choose_tiling` reads of a config: pixels per latent and the width its estimate scales by."""

    scale: int  # pixels per latent
    base_dim: int  # TILING_WIDTH of the direction


class ImageVAE21(ImageVAE):
    """Encode and decode still RGBA images (v1's `ImageVAE` behaviour: edge padding to multiples of 16, tiling,
    normalised latents). RGB inputs get an opaque alpha channel (1.0), as the reference converts to RGBA.
    Automatic tiling uses this VAE's own working-memory estimate (TILING_WIDTH)."""

    def __init__(self, cfg: VAE21Config = VAE21Config()):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.encoder = Encoder21(cfg)
        self.quant_conv = Conv2d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.post_quant_conv = Conv2d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder21(cfg)

    def tiling(self, tile, kind: str, x: torch.Tensor, budget: int | None):
        """The `tile` argument for ImageVAE's encode/decode: an explicit choice as given, "auto" / None resolved
        with this VAE's estimate (a Tiling, or False for one pass)."""
        if tile not in (None, "auto"):
            return tile
        plan = choose_tiling(tile, kind, x, _TilingView(self.cfg.scale, TILING_WIDTH[kind]), budget)
        return False if plan is None else plan

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
               tile=None, budget: int | None = None,
               check: Callable[[], None] | None = None) -> torch.Tensor:  # fmt: skip
        """Images [B, 4 (or 3), H, W] in [-1, 1] -> normalised latents [B, 64, ceil(H/16), ceil(W/16)]
        (the options of `ImageVAE.encode`)."""
        if images.shape[1] == 3:
            images = torch.cat([images, torch.ones_like(images[:, :1])], 1)
        tile = self.tiling(tile, "encode", images, budget)
        return super().encode(images, sample, generator, tile, budget, check)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile=None, budget: int | None = None,
               check: Callable[[], None] | None = None) -> torch.Tensor:  # fmt: skip
        """Normalised latents [B, 64, h, w] -> RGBA images [B, 4, 16h, 16w] in [-1, 1] (`ImageVAE.decode`)."""
        return super().decode(latents, self.tiling(tile, "decode", latents, budget), budget, check)
