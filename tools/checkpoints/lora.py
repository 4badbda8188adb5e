"""Writers of random DiT LoRA files in the three real layouts (diffusers/PEFT, kohya, lightx2v Lightning)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen_image_core.mmdit import MMDiTConfig

# the layers LoRA trainers usually target, per block, plus two top-level ones
BLOCK_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "txt_mlp.net.2",
    "img_mod.1",
)
TOP_TARGETS = ("img_in", "proj_out")
FORMATS = ("peft", "kohya", "lightx2v")


def _shape(cfg: MMDiTConfig, target: str) -> tuple[int, int]:
    """(out, in) of a target layer."""
    h = cfg.hidden
    return {
        "img_in": (h, cfg.in_channels),
        "proj_out": (cfg.in_channels, h),
        "attn.to_q": (h, h),
        "attn.to_k": (h, h),
        "attn.add_v_proj": (h, h),
        "attn.to_out.0": (h, h),
        "attn.to_add_out": (h, h),
        "img_mlp.net.0.proj": (cfg.mlp_dim, h),
        "txt_mlp.net.2": (h, cfg.mlp_dim),
        "img_mod.1": (6 * h, h),
    }[target]


def lora_modules(cfg: MMDiTConfig) -> list[tuple[str, tuple[int, int]]]:
    mods = [(t, _shape(cfg, t)) for t in TOP_TARGETS]
    for i in range(cfg.num_layers):
        mods += [(f"transformer_blocks.{i}.{t}", _shape(cfg, t)) for t in BLOCK_TARGETS]
    return mods


def write_lora(
    path: Path,
    cfg: MMDiTConfig,
    fmt: str,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random LoRA over `lora_modules(cfg)`; `alpha` goes to `.alpha` tensors or, for PEFT, the metadata."""
    g = torch.Generator().manual_seed(seed)
    sd, metadata = {}, None
    for module, (out_f, in_f) in lora_modules(cfg):
        down = (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(dtype)
        up = (torch.randn(out_f, rank, generator=g) * 0.1).to(dtype)
        if fmt == "peft":
            sd[f"transformer.{module}.lora_A.weight"] = down
            sd[f"transformer.{module}.lora_B.weight"] = up
        elif fmt in ("kohya", "lightx2v"):
            base = f"lora_unet_{module.replace('.', '_')}" if fmt == "kohya" else f"diffusion_model.{module}"
            sd[f"{base}.lora_down.weight"] = down
            sd[f"{base}.lora_up.weight"] = up
            sd[f"{base}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        else:
            raise ValueError(f"unknown LoRA format {fmt!r}; one of {FORMATS}")
    if fmt == "peft":
        cfg_json = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": sorted({m.split(".", 2)[-1] for m, _ in lora_modules(cfg)}),
        }
        metadata = {
            "format": "pt",
            "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in cfg_json.items()}),
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=metadata)
    return path
