"""Random Qwen-Image-2.1 VAE checkpoints, at any width.

* "diffusers": a repo folder with `vae/config.json` (`_class_name` AutoencoderKLQwenImage21) +
  `vae/diffusion_pytorch_model.safetensors`;
* "single": one `qwen_image_2.1_vae_bf16.safetensors` with the same (diffusers) names;
* "comfy": one `qwen_image_2.1_vae_bf16.safetensors` as Comfy-Org ships it: ComfyUI's Wan 2.2-style names
  (`comfy.ldm.wan.vae2_2.WanVAE`) with one-frame-deep 5-D conv weights (`comfy_state_dict`; written here from the
  diffusers names independently of the reader's `formats.vae21.comfy_to_diffusers`).

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


def comfy_name(name: str, cfg: VAE21Config) -> str:
    """A diffusers name in ComfyUI's WanVAE naming (`cfg` places each stage's Resample after its residual blocks)."""
    top = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
    for d, c in top.items():
        if name.startswith(d):
            return c + name[len(d) :]
    part, rest = name.split(".", 1)  # encoder / decoder
    stage = {"encoder": ("down_blocks", "downsamples", "downsampler", cfg.num_res_blocks),
             "decoder": ("up_blocks", "upsamples", "upsampler", cfg.num_res_blocks + 1)}[part]  # fmt: skip
    blocks, seq, resample, at = stage
    fixed = {"conv_in.": "conv1.", "norm_out.": "head.0.", "conv_out.": "head.2.",
             "mid_block.resnets.0.": "middle.0.", "mid_block.attentions.0.": "middle.1.",
             "mid_block.resnets.1.": "middle.2."}  # fmt: skip
    for d, c in fixed.items():
        if rest.startswith(d):
            rest = c + rest[len(d) :]
            break
    else:
        if rest.startswith(blocks + "."):
            i, kind, tail = rest[len(blocks) + 1 :].split(".", 2)
            if kind == resample:
                rest = f"{seq}.{i}.{seq}.{at}.{tail}"
            else:  # resnets.j.<inner>
                j, tail = tail.split(".", 1)
                rest = f"{seq}.{i}.{seq}.{j}.{tail}"
    inner = {".norm1.": ".residual.0.", ".conv1.": ".residual.2.", ".norm2.": ".residual.3.",
             ".conv2.": ".residual.6.", ".conv_shortcut.": ".shortcut."}  # fmt: skip
    if ".middle.1." not in "." + rest:
        for d, c in inner.items():
            rest = rest.replace(d, c)
    return f"{part}.{rest}"


def comfy_state_dict(weights: dict[str, torch.Tensor], cfg: VAE21Config) -> dict[str, torch.Tensor]:
    """Diffusers-named 2.1 VAE weights in ComfyUI's layout: names as `comfy_name`, and every causal conv weight
    (all 4-D weights but the Resamples' 2D `resample.1` and the attention's 1x1 convs) one frame deep, 5-D."""
    out = {}
    for k, v in weights.items():
        name = comfy_name(k, cfg)
        conv3d = v.dim() == 4 and name.endswith(".weight") and ".resample." not in name and ".middle.1." not in name
        out[name] = v.unsqueeze(2) if conv3d else v
    return out


def write_vae21(folder, kind: str = "diffusers", cfg: VAE21Config | None = None, dtype=torch.bfloat16,
                seed: int = 0) -> Path:  # fmt: skip
    """Write a random 2.1 VAE into `folder`; returns what to load (the repo folder or the .safetensors file)."""
    cfg = cfg or VAE21Config(**TINY)
    folder = Path(folder)
    weights = {k: v.to(dtype).contiguous() for k, v in random_weights(cfg, seed).items()}
    if kind in ("single", "comfy"):
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "qwen_image_2.1_vae_bf16.safetensors"
        tensors = comfy_state_dict(weights, cfg) if kind == "comfy" else weights
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return path
    if kind == "diffusers":
        vae = folder / "vae"
        vae.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": CLASS_NAME, "_diffusers_version": "0.42.1", **diffusers_config(cfg)}
        (vae / "config.json").write_text(json.dumps(config, indent=2))
        save_file(weights, str(vae / "diffusion_pytorch_model.safetensors"))
        return folder
    raise ValueError(f"kind must be 'diffusers', 'single' or 'comfy', got {kind!r}")
