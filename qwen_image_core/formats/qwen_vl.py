"""Qwen2.5-VL condition-encoder checkpoints: names, prefixes, float8 scales and detection, as data.

Canonical names are the legacy Qwen2.5-VL ones that the diffusers `text_encoder/` shards and ComfyUI's
`qwen_2.5_vl_7b*.safetensors` use: `model.*` for the language model, `visual.*` for the vision tower.
transformers 5 names (`model.language_model.*`, `model.visual.*`) are renamed to them; `lm_head` is never
loaded. Layouts handled:

* diffusers / HF `text_encoder/` folder, sharded via `model.safetensors.index.json` (either naming)
* ComfyUI single files, bf16 or "scaled fp8" (float8 Linear weights + float32 `scale_weight` per layer)
* the same keys under `text_encoders.qwen25_7b.transformer.` inside a full ComfyUI checkpoint
* files without `visual.*` (text-to-image only)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..checkpoint import Checkpoint, CheckpointError
from .common import split_scales

# prefixes under which the encoder's keys may sit, tried in order ("" = bare keys)
PREFIXES = ("text_encoders.qwen25_7b.transformer.", "text_encoder.", "")
# transformers >= 5 in-memory names -> legacy names (first matching rule wins)
RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))
# keys present in the files that the encoder never uses
DROPPED_PREFIXES = ("lm_head.",)
# one key that every Qwen2.5-VL language model has, with the bias that tells it from Llama-style models
PROBE = "model.layers.0.self_attn.k_proj.bias"
VISION_PREFIX = "visual."

# what other files look like: (a key fragment that identifies them, a human name); checked in order
OTHER_FAMILIES = (
    ("self_attn.q_norm.weight", "a Qwen3 language model (Qwen3 text encoder), not Qwen2.5-VL"),
    ("double_blocks.0.img_attn", "a Flux diffusion model, not a Qwen2.5-VL text encoder"),
    ("blocks.0.self_attn.q.weight", "a Wan video diffusion model, not a Qwen2.5-VL text encoder"),
    ("transformer_blocks.0.img_mod.1.weight", "a Qwen-Image diffusion model (DiT), not its text encoder"),
    ("txt_norm.weight", "a Qwen-Image diffusion model (DiT), not its text encoder"),
    ("input_blocks.0.0.weight", "a Stable Diffusion UNet, not a Qwen2.5-VL text encoder"),
    ("decoder.conv_in", "a VAE, not a Qwen2.5-VL text encoder"),
    ("decoder.middle.0", "a (Wan/Qwen-Image) VAE, not a Qwen2.5-VL text encoder"),
    ("encoder.block.0.layer.0", "a T5 text encoder, not Qwen2.5-VL"),
    ("text_model.encoder.layers.0", "a CLIP text encoder, not Qwen2.5-VL"),
    ("model.layers.0.self_attn.k_proj.weight", "a Llama-style language model without q/k/v biases, not Qwen2.5-VL"),
    ("lora_", "a LoRA, not a Qwen2.5-VL text encoder"),
)
# relatives that share the language-model probe but differ elsewhere: (key fragment, human name)
OTHER_VERSIONS = (("visual.blocks.0.mlp.fc1.weight", "a Qwen2-VL (first version) model, not Qwen2.5-VL"),)


def find_prefix(keys: list[str]) -> str | None:
    """The prefix under which a Qwen2.5-VL language model sits, in either naming; None if there is none."""
    keyset = set(keys)
    for p in PREFIXES:
        if p + PROBE in keyset or p + "model.language_model.layers.0.self_attn.k_proj.bias" in keyset:
            return p
    return None


def describe_other(keys: list[str]) -> str:
    """A short guess of what a non-Qwen2.5-VL file is, for error messages."""
    for fragment, name in OTHER_FAMILIES:
        if any(fragment in k for k in keys):
            return name
    return "not a Qwen2.5-VL text encoder (no model.layers.0.self_attn.k_proj.bias)"


def canonical_name(key: str) -> str:
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def encoder_tensors(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The encoder's weights under legacy names and its float8 scales ({"<layer>.weight": scale}).

    Raises CheckpointError naming the file when it is not a Qwen2.5-VL encoder (saying what it looks like).
    """
    keys = list(ckpt.keys())
    prefix = find_prefix(keys)
    if prefix is None:
        raise CheckpointError(f"{ckpt.path}: this is {describe_other(keys)}")
    for fragment, name in OTHER_VERSIONS:
        if any(fragment in k for k in keys):
            raise CheckpointError(f"{ckpt.path}: this is {name}")
    selected: dict[str, torch.Tensor] = {}
    for k in keys:
        if not k.startswith(prefix):
            continue
        name = canonical_name(k[len(prefix) :])
        if name.startswith(DROPPED_PREFIXES):
            continue
        if name in selected:
            raise CheckpointError(f"{ckpt.path}: holds {name} twice (in legacy and transformers-5 naming)")
        selected[name] = ckpt[k]
    return split_scales(selected)


def has_vision(tensors: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(VISION_PREFIX) for k in tensors)
