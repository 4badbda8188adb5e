"""Checkpoint formats of the Qwen-Image DiT, as data, and the reader that turns any of them into weights.

Accepted (keys as in diffusers' `QwenImageTransformer2DModel`, one naming for every layout):
* ComfyUI single files (Comfy-Org repackages): no prefix, or `model.diffusion_model.`; bf16/fp16/fp32;
  `float8_e4m3fn` / `float8_e5m2` weights without scales; ComfyUI "scaled fp8" (marker tensor
  `scaled_fp8`, per-layer float32 `<layer>.scale_weight`); ComfyUI "mixed precision" (safetensors metadata
  `_quantization_metadata`, per-layer `<layer>.weight_scale`, optional `<layer>.comfy_quant` JSON bytes).
  Edit-2511 repackages carry the empty marker `__index_timestep_zero__` that switches `zero_cond_t` on.
* diffusers folders: `transformer/` (sharded through the index json, or one file) with `config.json`
  (`zero_cond_t`, sizes), or a whole repo folder holding `model_index.json` and `transformer/`.
float8 weights stay float8; the model dequantises them one layer at a time (`ops.Linear`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, open_checkpoint
from .common import FP8, common_prefix, split_scales

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# keys (prefix-free) that every Qwen-Image DiT has; ComfyUI's model detection keys off txt_norm.weight
SIGNATURE = ("txt_norm.weight", "img_in.weight", "txt_in.weight", "proj_out.weight")
ZERO_COND_MARKER = "__index_timestep_zero__"  # empty tensor in ComfyUI's Edit-2511 files
QUANT_METADATA = "_quantization_metadata"  # safetensors metadata of ComfyUI's mixed-precision files
FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
FOLDER_NAMES = ("transformer",)  # sub-folder of a diffusers repo holding the DiT
CLASS_NAME = "QwenImageTransformer2DModel"  # `_class_name` of a diffusers transformer config.json

# Other model families, recognised by one characteristic key suffix, checked in this order.
OTHER_FAMILIES = (
    ("lora_down.weight", "a LoRA (kohya / lightx2v layout): load it with the Qwen-Image LoRA node"),
    ("lora_A.weight", "a LoRA (diffusers / PEFT layout): load it with the Qwen-Image LoRA node"),
    ("lora_A.default.weight", "a LoRA (PEFT layout): load it with the Qwen-Image LoRA node"),
    ("double_blocks.0.img_attn.qkv.weight", "a Flux diffusion model (BFL/ComfyUI layout)"),
    ("single_transformer_blocks.0.attn.to_q.weight", "a Flux diffusion model (diffusers layout)"),
    ("joint_blocks.0.x_block.attn.qkv.weight", "an SD3 / SD3.5 MMDiT"),
    ("input_blocks.0.0.weight", "a Stable Diffusion UNet (SD1.x / SDXL)"),
    ("down_blocks.0.resnets.0.conv1.weight", "a diffusers UNet or VAE"),
    ("blocks.0.self_attn.q.weight", "a Wan video diffusion model"),
    ("decoder.conv_in.weight", "a VAE (SD / diffusers layout)"),
    ("decoder.conv1.weight", "a VAE (Wan / Qwen-Image layout)"),
    ("decoder.head.2.weight", "a VAE (Wan / Qwen-Image layout)"),
    ("layers.0.self_attn.q_proj.weight", "a text encoder (LLM layout)"),
    ("visual.blocks.0.attn.qkv.weight", "a vision-language encoder"),
)
# Keys of known relatives the DiT does not implement.
UNSUPPORTED = {
    "time_text_embed.addition_t_embedding.weight": "Qwen-Image-Layered (separate model, not supported)",
    "time_text_embed.guidance_embedder.linear_1.weight": "a guidance-distilled variant (no such Qwen-Image model)",
}
# diffusers config.json field -> MMDiTConfig field
CONFIG_FIELDS = {
    "num_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "attention_head_dim": "head_dim",
    "joint_attention_dim": "text_dim",
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "patch_size": "patch_size",
    "axes_dims_rope": "rope_axes",
    "zero_cond_t": "zero_cond_t",
}
# config.json switches of Qwen-Image variants this DiT does not implement
UNSUPPORTED_FLAGS = ("use_additional_t_cond", "use_layer3d_rope", "guidance_embeds")


@dataclass
class DiTWeights:
    """What a DiT checkpoint holds, in model terms: prefix-free weights, float8 scales, config hints."""

    path: Path
    tensors: dict[str, torch.Tensor]  # lazy, zero-copy views of the memory-mapped file(s)
    scales: dict[str, torch.Tensor]  # "<layer>.weight" -> float32 scale of a float8 weight
    config: dict = field(default_factory=dict)  # MMDiTConfig fields known from config.json / markers
    storage: str = ""  # human-readable storage format, e.g. "bf16", "scaled fp8 (float8_e4m3fn)"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(t.shape) for k, t in self.tensors.items()}


def resolve(path: str | os.PathLike) -> Path:
    """A diffusers repo folder resolves to its `transformer/` folder; files and other folders stay."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in FOLDER_NAMES:
        if (path / name).is_dir():
            return path / name
    if (path / "model_index.json").is_file():
        raise CheckpointError(f"{path}: diffusers repo without a transformer/ folder (holds no DiT)")
    return path


def read_config_json(folder: Path) -> dict:
    """MMDiTConfig fields from a diffusers transformer config.json (empty if there is none)."""
    f = folder / "config.json"
    if not folder.is_dir() or not f.is_file():
        return {}
    raw = json.loads(f.read_text())
    name = raw.get("_class_name")
    if name is not None and name != CLASS_NAME:
        raise CheckpointError(f"{f}: this is not a Qwen-Image DiT config ({name}; expected {CLASS_NAME})")
    for flag in UNSUPPORTED_FLAGS:
        if raw.get(flag):
            raise CheckpointError(f"{f}: `{flag}: true` belongs to a Qwen-Image variant this loader does not support")
    cfg = {ours: raw[theirs] for theirs, ours in CONFIG_FIELDS.items() if raw.get(theirs) is not None}
    if "rope_axes" in cfg:
        cfg["rope_axes"] = tuple(cfg["rope_axes"])
    return cfg


def identify(path, keys: list[str]) -> None:
    """Raise a clear CheckpointError unless the (prefix-free) keys look like a Qwen-Image DiT."""
    keyset = set(keys)
    for key, what in UNSUPPORTED.items():
        if key in keyset:
            raise CheckpointError(f"{path}: this is {what}, not a Qwen-Image DiT file")
    if all(k in keyset for k in SIGNATURE):
        return
    for suffix, what in OTHER_FAMILIES:
        if any(k == suffix or k.endswith("." + suffix) for k in keys):
            raise CheckpointError(f"{path}: this is not a Qwen-Image diffusion model (DiT) file; it looks like {what}")
    missing = [k for k in SIGNATURE if k not in keyset]
    raise CheckpointError(
        f"{path}: this is not a Qwen-Image diffusion model (DiT) file: it lacks {', '.join(missing)} "
        f"({len(keys)} tensors, e.g. {', '.join(keys[:3])})"
    )


def guess_family(keys: list[str]) -> str | None:
    """What a file of (possibly prefixed) keys looks like, for messages of other loaders; None if unknown."""
    bare = {k.removeprefix(common_prefix(keys, PREFIXES)) for k in keys}
    if all(k in bare for k in SIGNATURE):
        return "a Qwen-Image diffusion model (DiT)"
    return next(
        (what for suffix, what in OTHER_FAMILIES if any(k == suffix or k.endswith("." + suffix) for k in bare)), None
    )


def check_quantization(path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], prefix: str) -> str:
    """Validate float8 markers against the stored dtypes; return a description of the storage format."""
    fp8 = {k: t.dtype for k, t in tensors.items() if t.dtype in FP8}
    declared: dict[str, str] = {}
    if QUANT_METADATA in metadata:
        try:
            layers = json.loads(metadata[QUANT_METADATA])["layers"]
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable {QUANT_METADATA} metadata ({e})") from None
        declared.update({name.removeprefix(prefix): spec.get("format", "") for name, spec in layers.items()})
    for k, t in tensors.items():
        if k.endswith(".comfy_quant") and t.numel():
            try:
                declared[k.removesuffix(".comfy_quant")] = json.loads(bytes(t.tolist()).decode()).get("format", "")
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: unreadable {k} ({e})") from None
    for layer, fmt in declared.items():
        if layer + ".weight" not in tensors:
            raise CheckpointError(f"{path}: quantization metadata names layer {layer}, which has no weight in the file")
        dtype = tensors[layer + ".weight"].dtype
        if fmt not in FP8_FORMATS:
            raise CheckpointError(f"{path}: layer {layer} uses quantization format {fmt!r}; only float8 is supported")
        if dtype != FP8_FORMATS[fmt]:
            raise CheckpointError(f"{path}: layer {layer} is declared {fmt} but its weight is stored as {dtype}")
    if not fp8:
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
        return "/".join(dtypes)
    kinds = "/".join(sorted({str(d).removeprefix("torch.") for d in fp8.values()}))
    if declared:
        return f"mixed precision ({len(declared)} {kinds} layers)"
    if "scaled_fp8" in tensors or any(k.endswith(".scale_weight") for k in tensors):
        return f"scaled fp8 ({kinds})"
    return f"{kinds} (no scales)"


def read_dit(path: str | os.PathLike) -> DiTWeights:
    """Open a DiT checkpoint of any supported layout and return its prefix-free weights and scales.

    Raises CheckpointError naming the file for unreadable files and files of other model families.
    """
    path = resolve(path)
    config = read_config_json(path)
    ckpt = open_checkpoint(path)
    prefix = common_prefix(ckpt.keys(), PREFIXES)
    raw = {k.removeprefix(prefix): ckpt[k] for k in ckpt}
    identify(ckpt.path, [k for k in raw if k != ZERO_COND_MARKER])
    storage = check_quantization(ckpt.path, raw, ckpt.metadata, prefix)
    if ZERO_COND_MARKER in raw:
        del raw[ZERO_COND_MARKER]
        config.setdefault("zero_cond_t", True)
    tensors, scales = split_scales(raw)
    return DiTWeights(Path(ckpt.path), tensors, scales, config, storage)
