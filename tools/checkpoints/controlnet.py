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


# ---------------------------------------------------------------------------------------------------------
# The Fun ControlNet Union (VideoX-Fun, alibaba-pai/Qwen-Image-2512-Fun-Controlnet-Union): control_img_in and
# control_blocks.<k> (a DiT block + after_proj, block 0 also before_proj), no prefix, as the published file.
# ---------------------------------------------------------------------------------------------------------


def fun_config(dit: MMDiTConfig, num_blocks: int = 2, injection_layers=None):
    """A Fun ControlNet configuration of `dit`'s width; injection_layers default to every DiT block in turn."""
    from qwen_image_core.controlnet_fun import FunConfig  # noqa: PLC0415 (the core stays optional here)

    layers = tuple(range(num_blocks)) if injection_layers is None else tuple(injection_layers)
    return FunConfig(num_blocks=num_blocks, num_heads=dit.num_heads, head_dim=dit.head_dim, mlp_dim=dit.mlp_dim,
                     injection_layers=layers)  # fmt: skip


def fun_shapes(cfg) -> dict[str, tuple[int, ...]]:
    from qwen_image_core.controlnet_fun import FunControlNet  # noqa: PLC0415

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in FunControlNet(cfg).state_dict().items()}


def fun_tensor(name: str, shape, seed: int, zero_after: bool) -> torch.Tensor:
    if zero_after and ".after_proj." in name:  # the zero-initialised output projections of a fresh branch
        return torch.zeros(shape)
    return random_tensor(name, shape, seed)


def fun_state_dict(cfg, seed: int = 0, zero_after: bool = False) -> dict[str, torch.Tensor]:
    """The float32 random weights the Fun writer stores."""
    return {k: fun_tensor(k, s, seed, zero_after) for k, s in fun_shapes(cfg).items()}


def write_fun(path, cfg, seed: int = 0, dtype=torch.bfloat16, linear_dtype=None, zero_after: bool = False) -> Path:
    """A Fun ControlNet single file; `linear_dtype` (e.g. torch.float8_e4m3fn): Linear weights stored in it;
    injection layers other than the published (0, 12, 24, 36, 48) travel in the `config` metadata."""
    from qwen_image_core.formats import controlnet_fun as fun_format  # noqa: PLC0415

    entries = [
        (k, s, linear_dtype if linear_dtype is not None and is_linear_weight(k, s) else dtype,
         lambda k=k, s=s: fun_tensor(k, s, seed, zero_after))
        for k, s in fun_shapes(cfg).items()
    ]  # fmt: skip
    meta = None
    if tuple(cfg.injection_layers) != fun_format.INJECTION_LAYERS:
        meta = {"config": json.dumps({"controlnet": {"control_layers": list(cfg.injection_layers)}})}
    return write_safetensors(Path(path), entries, meta)
