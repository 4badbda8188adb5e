"""Checkpoint formats of the Qwen-Image DiT, as data, and the reader that turns any of them into weights.

Accepted (keys as in diffusers' `QwenImageTransformer2DModel`, one naming for every layout):
* ComfyUI single files (Comfy-Org repackages): no prefix, or `model.diffusion_model.`; bf16/fp16/fp32;
  `float8_e4m3fn` / `float8_e5m2` weights without scales; ComfyUI "scaled fp8" (marker tensor
  `scaled_fp8`, per-layer float32 `<layer>.scale_weight`); ComfyUI's quantised layers, mixed per layer
  (`<layer>.comfy_quant` JSON or the `_quantization_metadata` header: fp8, int8 / int8_convrot, nvfp4, mxfp8,
  w4a8, awq, convrot_w4a4; see `comfy_quant`), kept packed in memory.
  Edit-2511 repackages carry the empty marker `__index_timestep_zero__` that switches `zero_cond_t` on.
  Qwen-Image-Layered files are told by their `time_text_embed.addition_t_embedding.weight` (as ComfyUI
  detects them): it switches on both layered options, the additional timestep condition and the layer-3D
  RoPE (which has no weights of its own); a config.json's `use_layer3d_rope` / `use_additional_t_cond` win.
* diffusers folders: `transformer/` (sharded through the index json, or one file) with `config.json`
  (`zero_cond_t`, sizes), or a whole repo folder holding `model_index.json` and `transformer/`.
* GGUF files (`*.gguf`, city96 / QuantStack, as ComfyUI-GGUF reads them; see `formats/gguf.py`): the same key
  names (optional `model.diffusion_model.` prefix), `general.architecture` "qwen_image" (or none); quantised
  linear weights stay packed (`quant_gguf`), F32 / F16 / BF16 tensors load as they are.
Sizes: explicit overrides, then config.json (or a single file's `config` metadata), then the shapes where
they are unambiguous; the RoPE axes follow from the shapes only for the real 128-channel heads.
float8 weights stay float8 and packed weights packed; the model dequantises them one layer at a time
(`ops.Linear`). Files of other quantisation tools (Nunchaku, bitsandbytes, GPTQ) are refused by name (`foreign`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, open_checkpoint
from . import common, foreign, gguf
from .common import common_prefix

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# keys (prefix-free) that every Qwen-Image DiT has; ComfyUI's model detection keys off txt_norm.weight
SIGNATURE = ("txt_norm.weight", "img_in.weight", "txt_in.weight", "proj_out.weight")
ZERO_COND_MARKER = "__index_timestep_zero__"  # empty tensor in ComfyUI's Edit-2511 files
FOLDER_NAMES = ("transformer",)  # sub-folder of a diffusers repo holding the DiT
CLASS_NAME = "QwenImageTransformer2DModel"  # `_class_name` of a diffusers transformer config.json
# the second architecture has its own family and loader (qwen_image_core/qwen21, formats/dit21.py)
QWEN21_CLASS_NAME = "QwenImage21Transformer2DModel"
QWEN21 = "a Qwen-Image-2.1 DiT (the 7B single-stream model): load it with load_dit21 (qwen_image_core.qwen21)"

# Other model families, recognised by one characteristic key suffix, checked in this order.
OTHER_FAMILIES = (
    ("txt_in.text_norm.weight", QWEN21),
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
    "txt_in.text_norm.weight": QWEN21,
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
    "use_layer3d_rope": "layer3d_rope",
    "use_additional_t_cond": "additional_t_cond",
}
FLAG_FIELDS = ("zero_cond_t", "layer3d_rope", "additional_t_cond")  # the boolean ones
# the weight only Qwen-Image-Layered has; its presence implies both layered options
LAYERED_KEY = "time_text_embed.addition_t_embedding.weight"
# config.json switches of Qwen-Image variants this DiT does not implement
UNSUPPORTED_FLAGS = ("guidance_embeds",)
# A single file may carry its config.json as safetensors metadata `config` = {"transformer": {...}} (the
# convention of ComfyUI's LTX-Video files); the tiny test files do, the real Comfy-Org files need not.
CONFIG_METADATA, CONFIG_SECTION = "config", "transformer"
GGUF_CONFIG_KEY = "qwen_image.config"  # the same JSON as a GGUF metadata string (tiny test files)
GGUF_ARCHITECTURES = ("qwen_image", None, "pig")  # None: stable-diffusion.cpp files; "pig": ComfyUI-GGUF's alias
# sizes only the real model's shapes imply: 128-channel heads -> RoPE axes (16, 56, 56); 16 latent channels
REAL_HEAD_DIM, REAL_ROPE_AXES, LATENT_CHANNELS = 128, (16, 56, 56), 16
CONFIG_HINT = (
    "put the model's diffusers config.json ({fields}) next to the weights (a transformer/ folder), or pass "
    "the sizes to load_dit"
)


@dataclass
class DiTWeights:
    """What a DiT checkpoint holds, in model terms: prefix-free weights, float8 scales, config hints."""

    path: Path
    tensors: dict[str, torch.Tensor]  # read into memory (or views of the mapped file(s), mmap=True)
    scales: dict[str, torch.Tensor]  # "<layer>.weight" -> float32 scale of a float8 weight
    config: dict = field(default_factory=dict)  # every MMDiTConfig size (see `infer_config`)
    storage: str = ""  # human-readable storage format, e.g. "bf16", "scaled fp8 (float8_e4m3fn)"
    packed: dict = field(default_factory=dict)  # "<layer>.weight" -> (stored bytes, Quant, extras): GGUF, comfy_quant

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(t.shape) for k, t in self.tensors.items()} | {k: p[1].shape for k, p in self.packed.items()}


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


def config_fields(raw, where) -> dict:
    """MMDiTConfig fields from a diffusers transformer config (config.json or file metadata), types checked."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: a transformer config must be a JSON object")
    name = raw.get("_class_name")
    if name == QWEN21_CLASS_NAME:
        raise CheckpointError(f"{where}: this is {QWEN21}, not a Qwen-Image (v1) DiT config")
    if name is not None and name != CLASS_NAME:
        raise CheckpointError(f"{where}: this is not a Qwen-Image DiT config ({name}; expected {CLASS_NAME})")
    for flag in UNSUPPORTED_FLAGS:
        if raw.get(flag):
            raise CheckpointError(
                f"{where}: `{flag}: true` belongs to a Qwen-Image variant this loader does not support"
            )
    cfg = {}
    for theirs, ours in CONFIG_FIELDS.items():
        v = raw.get(theirs)
        if v is None:
            continue
        if ours == "rope_axes":
            if not (isinstance(v, list) and len(v) == 3 and all(common.positive_int(a) for a in v)):
                raise CheckpointError(f"{where}: {theirs} is {v!r}, expected three positive integers")
            v = tuple(v)
        elif ours in FLAG_FIELDS:
            if not isinstance(v, bool):
                raise CheckpointError(f"{where}: {theirs} is {v!r}, expected true or false")
        elif not common.positive_int(v):
            raise CheckpointError(f"{where}: {theirs} is {v!r}, expected a positive integer")
        cfg[ours] = v
    return cfg


def read_config_json(folder: Path) -> dict:
    """MMDiTConfig fields from a diffusers transformer config.json (empty if there is none)."""
    return common.read_config_json(folder, config_fields)


def metadata_config(metadata: Mapping[str, str], path) -> dict:
    """MMDiTConfig fields from a single file's `config` metadata ({"transformer": <config.json>}), or {}."""
    return common.metadata_config(metadata, path, config_fields, CONFIG_METADATA, CONFIG_SECTION)


def infer_config(shapes: Mapping[str, tuple[int, ...]], known: Mapping, path) -> dict:
    """Every MMDiTConfig size: `known` ones (overrides, config.json, metadata) first, the rest read off the
    prefix-free weight shapes where they say it unambiguously. What neither says is a CheckpointError."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{path}: not a complete Qwen-Image DiT (no {key})")
        return shapes[key]

    hidden, in_channels = shape("img_in.weight")
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks.")}
    head_dim = known.get("head_dim") or shape("transformer_blocks.0.attn.norm_q.weight")[0]
    if "num_heads" not in known and (head_dim <= 0 or hidden % head_dim):
        raise CheckpointError(f"{path}: width {hidden} does not split into heads of {head_dim} channels")
    cfg = dict(
        num_layers=max(blocks) + 1 if blocks else 0,
        num_heads=hidden // head_dim if head_dim > 0 else 0,
        head_dim=head_dim,
        mlp_dim=shapes.get("transformer_blocks.0.img_mlp.net.0.proj.weight", (4 * hidden,))[0],
        text_dim=shape("txt_in.weight")[1],
        in_channels=in_channels,
        timestep_dim=shape("time_text_embed.timestep_embedder.linear_1.weight")[1],
        layer3d_rope=LAYERED_KEY in shapes,
        additional_t_cond=LAYERED_KEY in shapes,
    )
    cfg.update(known)
    if "patch_size" not in cfg:  # in = out = latent channels x patch^2; the latent is the VAE's 16 channels
        out = cfg.get("out_channels", LATENT_CHANNELS)
        p = math.isqrt(cfg["in_channels"] // out) if cfg["in_channels"] % out == 0 else 0
        if p * p * out != cfg["in_channels"]:
            raise CheckpointError(
                f"{path}: cannot tell the patch size from {cfg['in_channels']} input channels; "
                + CONFIG_HINT.format(fields="patch_size, out_channels")
            )
        cfg["patch_size"] = p
    cfg.setdefault("out_channels", shape("proj_out.weight")[0] // cfg["patch_size"] ** 2)
    if "rope_axes" not in cfg:
        if cfg["head_dim"] != REAL_HEAD_DIM:
            raise CheckpointError(
                f"{path}: cannot tell the RoPE axes of {cfg['head_dim']}-channel heads from the weights (only the real "
                f"model's {REAL_HEAD_DIM} channels imply {REAL_ROPE_AXES}); "
                + CONFIG_HINT.format(fields="axes_dims_rope")
            )
        cfg["rope_axes"] = REAL_ROPE_AXES
    return cfg


def identify(path, keys: list[str], metadata: Mapping[str, str] | None = None) -> None:
    """Raise a clear CheckpointError unless the (prefix-free) keys look like a Qwen-Image DiT."""
    other = foreign.identify(keys, metadata)
    if other is not None:
        raise CheckpointError(f"{path}: this is {other}")
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


def read_dit(path: str | os.PathLike, mmap: bool = False, overrides: Mapping | None = None) -> DiTWeights:
    """Open a DiT checkpoint of any supported layout: prefix-free weights, scales and every config size.

    Sizes come from `overrides` (MMDiTConfig fields), then config.json / the file's `config` metadata, then
    the shapes (see `infer_config`), checked before any weight is read. Raises CheckpointError naming the
    file for unreadable files, sizes that cannot be known and files of other model families.
    """
    path = resolve(path)
    if gguf.is_gguf(path):
        return read_gguf(path, mmap, overrides)
    config = read_config_json(path)
    ckpt = open_checkpoint(path, mmap=mmap)
    prefix, names = prefix_free_names(ckpt.keys(), PREFIXES)
    identify(ckpt.path, [k for k in names if k != ZERO_COND_MARKER], ckpt.metadata)
    markers = common.read_markers(ckpt, names, lambda n: n.removeprefix(prefix))
    config = {**metadata_config(ckpt.metadata, ckpt.path), **config}
    if names.pop(ZERO_COND_MARKER, None) is not None:
        config.setdefault("zero_cond_t", True)
    config = infer_config(common.logical_shapes(ckpt, names, markers), {**config, **(overrides or {})}, ckpt.path)
    tensors, scales, packed, storage = common.read_stored(ckpt, names, markers)
    return DiTWeights(Path(ckpt.path), tensors, scales, config, storage, packed)


def prefix_free_names(keys, prefixes) -> tuple[str, dict[str, str]]:
    """(the prefix most keys carry, {prefix-free name: key})."""
    keys = list(keys)
    prefix = common_prefix(keys, prefixes)
    return prefix, {k.removeprefix(prefix): k for k in keys}


def open_gguf(path: Path, mmap: bool, architectures, family: str) -> gguf.GGUFFile:
    """A GGUF file whose general.architecture is one of `architectures`; else a CheckpointError saying what
    it holds instead of a `family`."""
    f = gguf.GGUFFile(path, mmap=mmap)
    arch = f.architecture
    if arch not in architectures:
        what = gguf.ARCHITECTURES.get(arch, f"a model of architecture {arch!r}")
        raise CheckpointError(f"{path}: this GGUF file holds {what} (general.architecture), not {family}")
    return f


def gguf_config(f: gguf.GGUFFile, path, key: str = GGUF_CONFIG_KEY) -> dict[str, str]:
    """A GGUF file's config JSON (metadata `key`) as single-file metadata {CONFIG_METADATA: JSON}."""
    raw_config = f.metadata.get(key)
    if raw_config is not None and not isinstance(raw_config, str):
        raise CheckpointError(f"{path}: metadata {key} is not a string of JSON")
    return {} if raw_config is None else {CONFIG_METADATA: raw_config}


def read_gguf(path: Path, mmap: bool = False, overrides: Mapping | None = None) -> DiTWeights:
    """A GGUF DiT: the architecture checked, the same key names, identification and sizes as a single file's
    (config from the `qwen_image.config` metadata string if present); linear weights in a quantised type stay
    packed, other quantised tensors (none in the published files) are dequantised to float32 at load."""
    f = open_gguf(path, mmap, GGUF_ARCHITECTURES, "a Qwen-Image DiT")
    _, names = prefix_free_names(f.entries, PREFIXES)
    identify(path, [k for k in names if k != ZERO_COND_MARKER])
    config = metadata_config(gguf_config(f, path), path)
    if names.pop(ZERO_COND_MARKER, None) is not None:
        config.setdefault("zero_cond_t", True)
    config = infer_config({n: f.shape(k) for n, k in names.items()}, {**config, **(overrides or {})}, path)

    def linear(name, shape):  # stays packed; Qwen-Image-Layered's embedding table (quantised too) loads as float
        return name.endswith(".weight") and len(shape) == 2 and name != LAYERED_KEY

    tensors, packed = gguf.load_weights(f, names, linear)
    return DiTWeights(Path(path), tensors, {}, config, gguf.describe(f, names.values()), packed)
