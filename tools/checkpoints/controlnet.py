"""Writers of random ControlNet files in the real layouts: InstantX Qwen-Image ControlNet (Union and, with 4 extra
condition channels, Inpainting), as the Comfy-Org repacks and diffusers' QwenImageControlNetModel store them.

An InstantX ControlNet is the DiT's own input layers and first blocks (same key names, without norm_out and
proj_out) plus `controlnet_blocks.<i>` (hidden -> hidden, one per block) and `controlnet_x_embedder` (the
patchified control latent, 64 + extra channels -> hidden). Tiny sizes the shapes do not tell travel in the
single file's `config` metadata ({"controlnet": <config.json>}) or the diffusers folder's config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwen_image_core.mmdit import MMDiTConfig

from .dit import diffusers_config, is_linear_weight, random_tensor, shapes, write_safetensors

# QwenImageControlNetModel's size arguments (besides extra_condition_channels)
CONFIG_KEYS = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
               "joint_attention_dim", "axes_dims_rope")  # fmt: skip


def instantx_shapes(cfg: MMDiTConfig, extra_channels: int = 0) -> dict[str, tuple[int, ...]]:
    out = {k: s for k, s in shapes(cfg).items() if not k.startswith(("norm_out.", "proj_out."))}
    h = cfg.hidden
    for i in range(cfg.num_layers):
        out[f"controlnet_blocks.{i}.weight"] = (h, h)
        out[f"controlnet_blocks.{i}.bias"] = (h,)
    out["controlnet_x_embedder.weight"] = (h, cfg.in_channels + extra_channels)
    out["controlnet_x_embedder.bias"] = (h,)
    return out


def state_dict(cfg: MMDiTConfig, seed: int = 0, extra_channels: int = 0) -> dict[str, torch.Tensor]:
    """The float32 random weights (diffusers naming) the writers store."""
    return {k: random_tensor(k, s, seed) for k, s in instantx_shapes(cfg, extra_channels).items()}


def config_json(cfg: MMDiTConfig, extra_channels: int = 0) -> dict:
    """The config.json diffusers writes for a QwenImageControlNetModel of this configuration."""
    conf = {k: v for k, v in diffusers_config(cfg).items() if k in CONFIG_KEYS}
    return {**conf, "_class_name": "QwenImageControlNetModel", "extra_condition_channels": extra_channels}


def _metadata(cfg: MMDiTConfig, extra_channels: int) -> dict[str, str] | None:
    if cfg.head_dim == 128 and cfg.rope_axes == (16, 56, 56):
        return None
    return {"config": json.dumps({"controlnet": config_json(cfg, extra_channels)})}


def write_instantx(
    path, cfg: MMDiTConfig, seed: int = 0, dtype=torch.bfloat16, extra_channels: int = 0, linear_dtype=None
) -> Path:
    """A ComfyUI single file; `linear_dtype` (e.g. torch.float8_e4m3fn): Linear weights stored in it, unscaled."""
    layout = instantx_shapes(cfg, extra_channels)
    entries = [
        (k, s, linear_dtype if linear_dtype is not None and is_linear_weight(k, s) else dtype,
         lambda k=k, s=s: random_tensor(k, s, seed))
        for k, s in layout.items()
    ]  # fmt: skip
    return write_safetensors(Path(path), entries, _metadata(cfg, extra_channels))


def write_diffusers(folder, cfg: MMDiTConfig, seed: int = 0, dtype=torch.float32, extra_channels: int = 0) -> Path:
    """A diffusers ControlNet folder: config.json + diffusion_pytorch_model.safetensors."""
    folder = Path(folder)
    layout = instantx_shapes(cfg, extra_channels)
    entries = [(k, s, dtype, lambda k=k, s=s: random_tensor(k, s, seed)) for k, s in layout.items()]
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", entries)
    (folder / "config.json").write_text(json.dumps(config_json(cfg, extra_channels), indent=2))
    return folder
