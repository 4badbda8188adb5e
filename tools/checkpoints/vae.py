"""Random Qwen-Image VAE checkpoints in the two real layouts, at any width.

* "comfy": one `qwen_image_vae.safetensors` with the original Wan 2.1 names (as Comfy-Org ships it);
* "diffusers": a repo folder with `vae/config.json` + `vae/diffusion_pytorch_model.safetensors`
  (`AutoencoderKLQwenImage` names).

All 5D convolution taps (and the video-only `time_conv` weights) are random, so a loader that slices
the wrong tap fails a parity test. Weights are scaled to keep activations near unit size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen_image_core.formats.vae import layout
from qwen_image_core.vae import VAEConfig


def random_vae_weights(cfg: VAEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """{diffusers name: float32 tensor} for every tensor of the 3D checkpoint, seeded."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, _, shape in layout(cfg):
        if name.endswith(".gamma"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        else:  # conv weight [out, in, (t,) kh, kw]: std 1/sqrt(fan-in of one frame); smaller on the outputs
            fan_in = shape[1] * shape[-1] * shape[-2]
            gain = 0.3 if name.endswith(("decoder.conv_out.weight", "encoder.conv_out.weight")) else 1.0
            t = torch.randn(shape, generator=g) * (gain / fan_in**0.5)
        out[name] = t
    return out


def write_vae(folder: str | Path, kind: str = "comfy", base_dim: int = 96, image_channels: int = 3,
              dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:  # fmt: skip
    """Write a random VAE into `folder`; returns the path to load (the .safetensors file or the repo folder)."""
    folder = Path(folder)
    cfg = VAEConfig(base_dim=base_dim, image_channels=image_channels)
    weights = {k: v.to(dtype) for k, v in random_vae_weights(cfg, seed).items()}
    if kind == "comfy":
        wan = {d: w for d, w, _ in layout(cfg)}
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "qwen_image_vae.safetensors"
        save_file({wan[k]: v for k, v in weights.items()}, str(path))
        return path
    if kind == "diffusers":
        vae = folder / "vae"
        vae.mkdir(parents=True, exist_ok=True)
        config = {
            "_class_name": "AutoencoderKLQwenImage", "_diffusers_version": "0.34.0.dev0", "attn_scales": [],
            "base_dim": base_dim, "dim_mult": list(cfg.dim_mult), "dropout": 0.0,
            "latents_mean": list(cfg.latents_mean), "latents_std": list(cfg.latents_std),
            "num_res_blocks": cfg.num_res_blocks, "temperal_downsample": list(cfg.temporal_downsample), "z_dim": 16,
        }  # fmt: skip
        if image_channels != 3:
            config["input_channels"] = image_channels
        (vae / "config.json").write_text(json.dumps(config, indent=2))
        save_file(weights, str(vae / "diffusion_pytorch_model.safetensors"))
        return folder
    raise ValueError(f"kind must be 'comfy' or 'diffusers', got {kind!r}")
