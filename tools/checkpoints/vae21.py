"""Random Qwen-Image-2.1 VAE checkpoints (`AutoencoderKLQwenImage21` names), at any width.

* "diffusers": a repo folder with `vae/config.json` (`_class_name` AutoencoderKLQwenImage21) +
  `vae/diffusion_pytorch_model.safetensors`;
* "single": one `qwen_image_2.1_vae_bf16.safetensors` with the same names.

Every tensor of `formats.vae21.layout` is random (the unused `time_conv` weights too); weights are scaled to keep
activations near unit size. `diffusers_config(cfg)` is the config.json, also the oracle's constructor arguments.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen_image_core.formats.vae21 import CLASS_NAME, layout
from qwen_image_core.qwen21.vae import VAE21Config

TINY = dict(encoder_dim=8, decoder_dim=12)  # the real stage structure (5 stages, 16x, 64 channels), narrow


def random_weights(cfg: VAE21Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """{name: float32 tensor} for every tensor of a 2.1 VAE file, seeded."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in layout(cfg).items():
        if name.endswith(".gamma"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        else:  # conv weight [out, in, kh, kw]: std 1/sqrt(fan-in); smaller on the outputs
            gain = 0.3 if name.endswith(("decoder.conv_out.weight", "encoder.conv_out.weight")) else 1.0
            t = torch.randn(shape, generator=g) * (gain / (shape[1] * shape[2] * shape[3]) ** 0.5)
        out[name] = t
    return out


def diffusers_config(cfg: VAE21Config) -> dict:
    """The diffusers config.json fields (AutoencoderKLQwenImage21 constructor arguments) for `cfg`."""
    return dict(
        base_dim=cfg.encoder_dim, decoder_base_dim=cfg.decoder_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks, attn_scales=[], temperal_downsample=list(cfg.temporal_downsample),
        dropout=0.0, latents_mean=list(cfg.latents_mean), latents_std=list(cfg.latents_std), is_residual=True,
        in_channels=cfg.image_channels, out_channels=cfg.image_channels, patch_size=None,
        scale_factor_temporal=8, scale_factor_spatial=cfg.scale,
    )  # fmt: skip


def write_vae21(folder, kind: str = "diffusers", cfg: VAE21Config | None = None, dtype=torch.bfloat16,
                seed: int = 0) -> Path:  # fmt: skip
    """Write a random 2.1 VAE into `folder`; returns what to load (the repo folder or the .safetensors file)."""
    cfg = cfg or VAE21Config(**TINY)
    folder = Path(folder)
    weights = {k: v.to(dtype).contiguous() for k, v in random_weights(cfg, seed).items()}
    if kind == "single":
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "qwen_image_2.1_vae_bf16.safetensors"
        save_file(weights, str(path))
        return path
    if kind == "diffusers":
        vae = folder / "vae"
        vae.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": CLASS_NAME, "_diffusers_version": "0.42.1", **diffusers_config(cfg)}
        (vae / "config.json").write_text(json.dumps(config, indent=2))
        save_file(weights, str(vae / "diffusion_pytorch_model.safetensors"))
        return folder
    raise ValueError(f"kind must be 'diffusers' or 'single', got {kind!r}")
