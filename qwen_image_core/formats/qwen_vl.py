"""Qwen2.5-VL condition-encoder checkpoints: names, prefixes, float8 scales and detection, as data.

Canonical names are the legacy Qwen2.5-VL ones that the diffusers `text_encoder/` shards and ComfyUI's
`qwen_2.5_vl_7b*.safetensors` use: `model.*` for the language model, `visual.*` for the vision tower.
transformers 5 names (`model.language_model.*`, `model.visual.*`) are renamed to them; `lm_head` is never
loaded. Layouts handled:

* diffusers / HF `text_encoder/` folder, sharded via `model.safetensors.index.json` (either naming)
* ComfyUI single files, bf16 or "scaled fp8" (float8 Linear weights + float32 `scale_weight` per layer), or
  with ComfyUI's quantised layers (`comfy_quant`, mixed per layer: int8 / int8_convrot, fp8, ...; the token
  embedding as int8 or fp8, dequantised per gathered row), kept packed
* the same keys under `text_encoders.qwen25_7b.transformer.` inside a full ComfyUI checkpoint
* files without `visual.*` (text-to-image only)

Sizes (`config_fields`): explicit overrides, then the folder's `config.json` (transformers 4 flat or 5 nested
`text_config`, `rope_scaling` or `rope_parameters`), or a single file's `config` metadata
({"text_encoder": <config.json>}), then the shapes. Shapes do not show head widths: without a config they
are Qwen2.5-VL's own (128 text channels, 80 vision channels, as in every published size) and a file whose
widths do not divide by them is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, CheckpointError
from . import comfy_quant, foreign
from .common import (
    checked_number,
    logical_shapes,
    metadata_config,
    read_config_json,
    read_markers,
    read_stored,
    select_names,
)

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
    (
        "visual.deepstack_merger_list.",
        "the Qwen3-VL text encoder of Qwen-Image-2.1 (use qwen21's load_qwen3_vl), "
        "not the Qwen2.5-VL encoder of Qwen-Image v1",
    ),
    (
        "self_attn.q_norm.weight",
        "a Qwen3 language model (a Qwen3 text encoder, or Qwen-Image-2.1's Qwen3-VL "
        "encoder without its vision tower: use qwen21's load_qwen3_vl), not Qwen2.5-VL",
    ),
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


def encoder_names(ckpt: Checkpoint) -> dict[str, str]:
    """{legacy name: file key} of the encoder's tensors (weights and scales), without reading any.

    Raises CheckpointError naming the file when it is not a Qwen2.5-VL encoder (saying what it looks like).
    """
    keys = list(ckpt.keys())
    other = foreign.identify(keys, ckpt.metadata)
    if other is not None:
        raise CheckpointError(f"{ckpt.path}: this is {other}")
    prefix = find_prefix(keys)
    if prefix is None:
        raise CheckpointError(f"{ckpt.path}: this is {describe_other(keys)}")
    for fragment, name in OTHER_VERSIONS:
        if any(fragment in k for k in keys):
            raise CheckpointError(f"{ckpt.path}: this is {name}")
    return select_names(ckpt, prefix, canonical_name, DROPPED_PREFIXES, "in legacy and transformers-5 naming")


def encoder_markers(ckpt: Checkpoint, names: Mapping[str, str]) -> dict[str, comfy_quant.Marker]:
    """The comfy_quant markers of the encoder's layers, under legacy names (`names`: legacy -> file key)."""
    return markers_under(ckpt, names, find_prefix(list(ckpt.keys())) or "")


def markers_under(ckpt: Checkpoint, names: Mapping[str, str], prefix: str) -> dict[str, comfy_quant.Marker]:
    """The comfy_quant markers of an encoder whose keys sit under `prefix`, under the names of `names`
    (canonical -> file key); a marker's layer is renamed by `names`, else by `canonical_name`."""
    layers = {k.removesuffix(".weight"): n.removesuffix(".weight") for n, k in names.items() if n.endswith(".weight")}
    return read_markers(ckpt, names, lambda k: layers.get(k, canonical_name(k.removeprefix(prefix))))


def encoder_shapes(ckpt: Checkpoint, names: Mapping[str, str], markers) -> dict[str, tuple[int, ...]]:
    """Legacy-named shapes, packed weights given as the float weights they stand for (for `config_fields`)."""
    return logical_shapes(ckpt, names, markers)


def encoder_weights(ckpt: Checkpoint, names: Mapping[str, str], markers):
    """(weights, float8 scales, packed comfy_quant layers, storage description), all under legacy names."""
    return read_stored(ckpt, names, markers)


def has_vision(tensors: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(VISION_PREFIX) for k in tensors)


# -- sizes
# config.json field (transformers) -> QwenVLConfig / VisionConfig field
TEXT_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "rms_norm_eps": "rms_eps",
    "rope_theta": "rope_theta",
    "mrope_section": "mrope_section",
}
VISION_FIELDS = {
    "depth": "depth",
    "hidden_size": "hidden_size",
    "num_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "out_hidden_size": "out_hidden_size",
    "in_channels": "in_channels",
    "in_chans": "in_channels",
    "patch_size": "patch_size",
    "spatial_patch_size": "patch_size",
    "temporal_patch_size": "temporal_patch_size",
    "spatial_merge_size": "merge_size",
    "window_size": "window_size",
    "fullatt_block_indexes": "full_attention_blocks",
    "rope_theta": "rope_theta",
}
FLOATS = ("rms_eps", "rope_theta")
LISTS = ("mrope_section", "full_attention_blocks")
MODEL_TYPES = ("qwen2_5_vl", "qwen2_5_vl_text")
CONFIG_METADATA, CONFIG_SECTION = "config", "text_encoder"  # as formats.dit: {"text_encoder": <config.json>}
# Qwen2.5-VL's own numbers (every published size), used where neither a config nor the shapes say
TEXT_HEAD_DIM, MROPE_SECTION, RMS_EPS, ROPE_THETA = 128, (16, 24, 24), 1e-6, 1_000_000.0
VISION_HEAD_DIM, FULL_ATTENTION_EVERY = 80, 8
HINT = (
    "put the model's config.json next to the weights (a text_encoder/ folder), or pass the sizes to load_text_encoder"
)


def _value(field: str, v, where):
    if field in LISTS:
        ok = isinstance(v, list) and all(isinstance(a, int) and not isinstance(a, bool) and a >= 0 for a in v)
        if not ok or (field == "mrope_section" and (len(v) != 3 or 0 in v)):
            raise CheckpointError(f"{where}: {field} is {v!r}, expected a list of non-negative integers")
        return tuple(v)
    return checked_number(field, v, where, FLOATS)


def parse_config(raw, where) -> dict:
    """QwenVLConfig fields (with "vision": VisionConfig fields) from a transformers Qwen2.5-VL config."""
    text = text_section(raw, MODEL_TYPES, "Qwen2.5-VL", where)
    for rope_key in ("rope_scaling", "rope_parameters"):  # transformers 4 / 5 spellings
        if isinstance(text.get(rope_key), dict):
            text = {**{k: v for k, v in text[rope_key].items() if k in TEXT_FIELDS}, **text}
    out = pick_fields(text, TEXT_FIELDS, _value, where)
    if "head_dim" not in out and "hidden_size" in out and "num_heads" in out:
        if out["hidden_size"] % out["num_heads"]:
            raise CheckpointError(f"{where}: hidden_size {out['hidden_size']} does not split into the heads")
        out["head_dim"] = out["hidden_size"] // out["num_heads"]
    vision = raw.get("vision_config")
    if isinstance(vision, dict):
        out["vision"] = vision_section(vision, VISION_FIELDS, _value, f"{where} vision_config")
    return out


def read_config(path: Path, metadata: Mapping[str, str]) -> dict:
    """Sizes from `path`/config.json (a folder), else the file's `config` metadata; {} when neither exists."""
    return config_from(path, metadata, parse_config)


def config_from(path, metadata: Mapping[str, str], parse) -> dict:
    """parse() of `path`/config.json (a folder), else of a single file's `config` metadata ({"text_encoder":
    <config.json>}); {} when neither exists. The Qwen2.5-VL and Qwen3-VL encoders' layout alike."""
    path = Path(path)
    if (path / "config.json").is_file():
        return read_config_json(path, parse)
    return metadata_config(metadata, path, parse, CONFIG_METADATA, CONFIG_SECTION)


def text_section(raw, model_types, family: str, where) -> dict:
    """A transformers VL config's language-model fields (its `text_config` over the top level), after checking
    it is a JSON object of one of `model_types` (or of none); CheckpointError naming `where` otherwise."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: a text-encoder config must be a JSON object")
    kind = raw.get("model_type")
    if kind is not None and kind not in model_types:
        raise CheckpointError(f"{where}: this config describes a {kind!r} model, not {family}")
    return {**raw, **(raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {})}


def pick_fields(section: Mapping, fields: Mapping[str, str], value, where) -> dict:
    """{our field: value(our field, v, where)} of the `fields` (theirs -> ours) a config section sets."""
    return {ours: value(ours, section[k], where) for k, ours in fields.items() if section.get(k) is not None}


def vision_section(vision: Mapping, fields: Mapping[str, str], value, where) -> dict:
    """The vision tower's fields of a transformers `vision_config` (its `rope_parameters` included)."""
    rope = vision["rope_parameters"] if isinstance(vision.get("rope_parameters"), dict) else {}
    return pick_fields({**vision, **rope}, fields, value, where)


def _shape(shapes, key, path) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{path}: an incomplete Qwen2.5-VL text encoder (no {key})")
    return shapes[key]


def _heads(width: int, head_dim: int, what: str, path) -> int:
    if width <= 0 or width % head_dim:
        raise CheckpointError(
            f"{path}: cannot tell the {what} heads: {width} channels are not a multiple of {head_dim}; {HINT}"
        )
    return width // head_dim


def config_fields(shapes: Mapping[str, tuple[int, ...]], known: Mapping, path) -> dict:
    """Every QwenVLConfig size: `known` ones (overrides, config) first, the rest off the legacy-named shapes."""
    known = dict(known)
    vision_known = known.pop("vision", None) or {}
    vocab, hidden = _shape(shapes, "model.embed_tokens.weight", path)
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith("model.layers.")}
    cfg = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_shape(shapes, "model.layers.0.mlp.gate_proj.weight", path)[0],
        num_layers=max(layers) + 1 if layers else 0,
        rms_eps=RMS_EPS,
        rope_theta=ROPE_THETA,
    )
    cfg.update(known)
    q_out = _shape(shapes, "model.layers.0.self_attn.q_proj.weight", path)[0]
    if "head_dim" not in cfg:  # q_proj is heads x head_dim wide
        heads = cfg.get("num_heads")
        cfg["head_dim"] = q_out // heads if heads and q_out % heads == 0 else TEXT_HEAD_DIM
    head_dim = cfg["head_dim"]
    if "num_heads" not in cfg:
        cfg["num_heads"] = _heads(q_out, head_dim, "query", path)
    if "num_kv_heads" not in cfg:
        k_out = _shape(shapes, "model.layers.0.self_attn.k_proj.weight", path)[0]
        cfg["num_kv_heads"] = _heads(k_out, head_dim, "key/value", path)
    if "mrope_section" not in cfg:
        if head_dim != TEXT_HEAD_DIM:
            raise CheckpointError(f"{path}: cannot tell the M-RoPE sections of {head_dim}-channel heads; {HINT}")
        cfg["mrope_section"] = MROPE_SECTION
    has_tower = "visual.patch_embed.proj.weight" in shapes
    cfg["vision"] = vision_fields(shapes, vision_known, path) if has_tower else None
    return cfg


def vision_fields(shapes: Mapping[str, tuple[int, ...]], known: Mapping, path, prefix: str = "visual.") -> dict:
    """Every VisionConfig size: `known` ones first, the rest off the shapes of the vision tower."""
    width, cin, tp, p, _ = _shape(shapes, prefix + "patch_embed.proj.weight", path)
    blocks = {int(k[len(prefix) + 7 :].split(".")[0]) for k in shapes if k.startswith(prefix + "blocks.")}
    cfg = dict(
        depth=max(blocks) + 1 if blocks else 0,
        hidden_size=width,
        intermediate_size=_shape(shapes, prefix + "blocks.0.mlp.gate_proj.weight", path)[0],
        out_hidden_size=_shape(shapes, prefix + "merger.mlp.2.weight", path)[0],
        in_channels=cin,
        patch_size=p,
        temporal_patch_size=tp,
    )
    cfg.update(known)
    if "num_heads" not in cfg:
        cfg["num_heads"] = _heads(cfg["hidden_size"], VISION_HEAD_DIM, "vision", path)
    if "merge_size" not in cfg:  # the merger's first layer is hidden x merge^2 wide
        units = _shape(shapes, prefix + "merger.mlp.0.weight", path)[1] // cfg["hidden_size"]
        cfg["merge_size"] = math.isqrt(units)
        if cfg["merge_size"] ** 2 * cfg["hidden_size"] != shapes[prefix + "merger.mlp.0.weight"][1]:
            raise CheckpointError(f"{path}: cannot tell the vision merge size from the merger; {HINT}")
    if "full_attention_blocks" not in cfg:
        cfg["full_attention_blocks"] = tuple(i for i in range(cfg["depth"]) if i % FULL_ATTENTION_EVERY == 7)
    return cfg
