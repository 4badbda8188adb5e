"""Qwen3-VL condition-encoder checkpoints (Qwen-Image-2.1): names, prefixes, detection and sizes, as data.

Canonical names are ComfyUI's module names: `model.*` (language model, `Llama2_`: `embed_tokens`,
`layers.N.self_attn.{q,k,v,o}_proj` and `q_norm` / `k_norm`, `mlp.{gate,up,down}_proj`, `input_layernorm`,
`post_attention_layernorm`, `norm`) and `visual.*` (vision tower, `Qwen3VLVisionModel`: `patch_embed.proj` (Conv3d),
`pos_embed`, `blocks.N.{norm1,norm2,attn.qkv,attn.proj,mlp.linear_fc1,mlp.linear_fc2}`, `merger.*`,
`deepstack_merger_list.N.{norm,linear_fc1,linear_fc2}`), checked in Comfy-Org/ComfyUI
`comfy/text_encoders/qwen_image21.py` @ 19d1def1f425 (its encoder subclasses qwen3vl.py's `Qwen3VLClipModel`,
model_type qwen3vl_8b), comfyanonymous/ComfyUI `comfy/text_encoders/qwen3vl.py` @ 21f3a1cad132 and `qwen35.py`
@ 0b43910a8a8a; they equal transformers' names with its `model.language_model.` / `model.visual.` prefixes
shortened. Names seen:
* Comfy-Org's files (`qwen3vl_8b_{bf16,int8_convrot,w4a8}`): the language model as `model.*`, the vision tower as
  `model.visual.*`, the generation head as a top-level `lm_head.*` (quantised in int8_convrot), which ComfyUI's
  loader renames (`model.language_model.` -> `model.`, `model.visual.` -> `visual.`, `lm_head.` -> `model.lm_head.`)
  before loading. This comes from third-party code that reads those files and replicates `comfy.sd.load_clip`: the
  newer `comfy/sd.py` holding it is not in the code index at a version with the 2.1 encoder (reported, not checked);
* ComfyUI's own names (`visual.*`, `model.lm_head.*`), e.g. a file ComfyUI saved;
* transformers' (`model.language_model.*`, `model.visual.*`, as in the diffusers `text_encoder/` folder of
  Qwen/Qwen-Image-2.1).
All are renamed to the canonical names (`qwen_vl.canonical_name`, the same rules as Qwen2.5-VL); the head
(`lm_head.*` / `model.lm_head.*`, with any quantisation tensors) is never loaded. Layouts handled, through the
shared readers:

* diffusers / HF `text_encoder/` folder, sharded via `model.safetensors.index.json` (either naming)
* single files: bf16 (`qwen3vl_8b_bf16`), or with ComfyUI's quantised layers (`comfy_quant`, mixed per layer:
  `qwen3vl_8b_int8_convrot`, `qwen3vl_8b_w4a8` = asym_w4a8_int8), kept packed (`formats.comfy_quant`)
* files without the vision tower (text-to-image only)

Detection: a Qwen3-VL language model has per-head q/k norms and no q/k/v biases; a Qwen2.5-VL file (biases,
the v1 encoder) is refused here with a pointer to the v1 loader, and the v1 loader refuses these files.

Sizes (`config_fields`): explicit overrides, then config.json (transformers 5 nested `text_config` /
`vision_config`, `rope_parameters`) or a single file's `config` metadata, then the shapes. The shapes give
every width (the q/k norms give the head width); what they cannot give is Qwen3-VL-8B's own: RoPE base and
sections, the vision heads (72 channels) and the DeepStack layers (8, 16, 24 for the 27-block tower; other
depths need a config). Those defaults are ComfyUI's for qwen3vl_8b too (`Qwen3VL_8BConfig`: RoPE base 5e6, sections
[24, 20, 20] interleaved, 128-wide heads, eps 1e-6; `QWEN3VL_VISION`: 16 heads of a 1152-wide, 27-block tower,
DeepStack at 8, 16, 24).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from ..checkpoint import Checkpoint, CheckpointError
from . import foreign, qwen_vl
from .common import checked_number, select_names
from .qwen_vl import canonical_name, config_from, markers_under, pick_fields, text_section, vision_section

WHAT = "Qwen3-VL text encoder (Qwen-Image-2.1)"
PREFIXES = ("text_encoders.qwen3vl_8b.transformer.", "text_encoder.", "")  # tried in order ("" = bare keys)
DROPPED_PREFIXES = ("lm_head.", "model.lm_head.")  # the file's generation head, and ComfyUI's name for it
PROBE = "model.layers.0.self_attn.q_norm.weight"  # per-head query norm: Qwen3 language models
PROBE_T5 = "model.language_model.layers.0.self_attn.q_norm.weight"
QWEN25_PROBE = "self_attn.k_proj.bias"  # Qwen2.5-VL (the v1 encoder) has q/k/v biases
OTHER_FAMILIES = (
    (QWEN25_PROBE, "the Qwen2.5-VL text encoder of Qwen-Image v1 (use load_text_encoder), not Qwen3-VL"),
    ("txt_in.text_norm.weight", "a Qwen-Image-2.1 diffusion model (DiT), not its text encoder"),
    ("transformer_blocks.0.img_mod.1.weight", "a Qwen-Image diffusion model (DiT), not a text encoder"),
    ("decoder.conv_in", "a VAE, not a Qwen3-VL text encoder"),
    ("decoder.middle.0", "a (Wan/Qwen-Image) VAE, not a Qwen3-VL text encoder"),
    ("double_blocks.0.img_attn", "a Flux diffusion model, not a Qwen3-VL text encoder"),
    ("lora_", "a LoRA, not a Qwen3-VL text encoder"),
)

# -- sizes: config.json field -> Qwen3VLConfig / Vision3Config field
TEXT_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim", "rms_norm_eps": "rms_eps", "rope_theta": "rope_theta", "mrope_section": "mrope_section",
}  # fmt: skip
VISION_FIELDS = {
    "depth": "depth", "hidden_size": "hidden_size", "num_heads": "num_heads",
    "intermediate_size": "intermediate_size", "out_hidden_size": "out_hidden_size", "in_channels": "in_channels",
    "patch_size": "patch_size", "temporal_patch_size": "temporal_patch_size", "spatial_merge_size": "merge_size",
    "num_position_embeddings": "num_position_embeddings", "deepstack_visual_indexes": "deepstack_layers",
    "rope_theta": "rope_theta",
}  # fmt: skip
FLOATS, LISTS = ("rms_eps", "rope_theta"), ("mrope_section", "deepstack_layers")
MODEL_TYPES = ("qwen3_vl", "qwen3_vl_text")
# Qwen3-VL-8B's own numbers, used where neither a config nor the shapes say
MROPE_SECTION, ROPE_THETA, RMS_EPS, TEXT_HEAD_DIM = (24, 20, 20), 5_000_000.0, 1e-6, 128
VISION_HEAD_DIM, DEEPSTACK = 72, {27: (8, 16, 24)}  # vision depth -> DeepStack layers
HINT = "put the model's config.json next to the weights (a text_encoder/ folder), or pass the sizes to the loader"


def find_prefix(keys) -> str | None:
    keyset = set(keys)
    for p in PREFIXES:
        if p + PROBE in keyset or p + PROBE_T5 in keyset:
            return p
    return None


def encoder_names(ckpt: Checkpoint) -> dict[str, str]:
    """{canonical name: file key} of the encoder's tensors, without reading any; CheckpointError naming the
    file (and what it looks like) when it is not a Qwen3-VL encoder."""
    keys = list(ckpt.keys())
    other = foreign.identify(keys, ckpt.metadata)
    if other is not None:
        raise CheckpointError(f"{ckpt.path}: this is {other}")
    for fragment, name in OTHER_FAMILIES:
        if any(fragment in k for k in keys):
            raise CheckpointError(f"{ckpt.path}: this is {name}")
    prefix = find_prefix(keys)
    if prefix is None:
        raise CheckpointError(f"{ckpt.path}: this is not a {WHAT} (no {PROBE})")
    return select_names(ckpt, prefix, canonical_name, DROPPED_PREFIXES, "in two namings")


def encoder_markers(ckpt: Checkpoint, names: Mapping[str, str]) -> dict:
    """The comfy_quant markers of the encoder's layers, under canonical names."""
    return markers_under(ckpt, names, find_prefix(list(ckpt.keys())) or "")


# shapes and tensors under canonical names: the same steps as Qwen2.5-VL's
encoder_shapes, encoder_weights = qwen_vl.encoder_shapes, qwen_vl.encoder_weights


def _value(field: str, v, where):
    if field in LISTS:
        if not isinstance(v, (list, tuple)) or not all(isinstance(a, int) and a >= 0 for a in v):
            raise CheckpointError(f"{where}: {field} is {v!r}, expected a list of non-negative integers")
        return tuple(v)
    return checked_number(field, v, where, FLOATS)


def parse_config(raw, where) -> dict:
    """Qwen3VLConfig fields (with "vision": Vision3Config fields) from a transformers Qwen3-VL config."""
    text = text_section(raw, MODEL_TYPES, "Qwen3-VL", where)
    if isinstance(text.get("rope_parameters"), dict):
        text = {**{k: v for k, v in text["rope_parameters"].items() if k in TEXT_FIELDS}, **text}
    out = pick_fields(text, TEXT_FIELDS, _value, where)
    vision = raw.get("vision_config")
    if isinstance(vision, dict):
        out["vision"] = vision_section(vision, VISION_FIELDS, _value, f"{where} vision_config")
    return out


def read_config(path: Path, metadata: Mapping[str, str]) -> dict:
    """Sizes from `path`/config.json (a folder), else a single file's `config` metadata ({"text_encoder":
    <config.json>}, as `formats.qwen_vl`); {} when neither exists."""
    return config_from(path, metadata, parse_config)


def _shape(shapes, key, path) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{path}: an incomplete {WHAT} (no {key})")
    return shapes[key]


def _count(shapes, prefix: str) -> int:
    found = {int(k[len(prefix) :].split(".")[0]) for k in shapes if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def config_fields(shapes: Mapping[str, tuple[int, ...]], known: Mapping, path) -> dict:
    """Every Qwen3VLConfig size: `known` ones (overrides, config) first, the rest off the canonical shapes."""
    known = dict(known)
    vision_known = known.pop("vision", None) or {}
    vocab, hidden = _shape(shapes, "model.embed_tokens.weight", path)
    head_dim = _shape(shapes, PROBE, path)[0]
    cfg = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_shape(shapes, "model.layers.0.mlp.gate_proj.weight", path)[0],
        num_layers=_count(shapes, "model.layers."),
        head_dim=head_dim,
        num_heads=_shape(shapes, "model.layers.0.self_attn.q_proj.weight", path)[0] // head_dim,
        num_kv_heads=_shape(shapes, "model.layers.0.self_attn.k_proj.weight", path)[0] // head_dim,
        rms_eps=RMS_EPS,
        rope_theta=ROPE_THETA,
    )
    cfg.update(known)
    if "mrope_section" not in cfg:
        if cfg["head_dim"] != TEXT_HEAD_DIM:
            raise CheckpointError(f"{path}: cannot tell the M-RoPE sections of {cfg['head_dim']}-wide heads; {HINT}")
        cfg["mrope_section"] = MROPE_SECTION
    has_tower = "visual.patch_embed.proj.weight" in shapes
    cfg["vision"] = vision_fields(shapes, vision_known, path) if has_tower else None
    return cfg


def vision_fields(shapes: Mapping[str, tuple[int, ...]], known: Mapping, path) -> dict:
    """Every Vision3Config size: `known` ones first, the rest off the vision tower's shapes."""
    width, cin, tp, p, _ = _shape(shapes, "visual.patch_embed.proj.weight", path)
    cfg = dict(
        depth=_count(shapes, "visual.blocks."),
        hidden_size=width,
        intermediate_size=_shape(shapes, "visual.blocks.0.mlp.linear_fc1.weight", path)[0],
        out_hidden_size=_shape(shapes, "visual.merger.linear_fc2.weight", path)[0],
        in_channels=cin,
        patch_size=p,
        temporal_patch_size=tp,
        num_position_embeddings=_shape(shapes, "visual.pos_embed.weight", path)[0],
    )
    cfg.update(known)
    if "num_heads" not in cfg:
        if cfg["hidden_size"] % VISION_HEAD_DIM:
            raise CheckpointError(f"{path}: cannot tell the vision heads of a {cfg['hidden_size']}-wide tower; {HINT}")
        cfg["num_heads"] = cfg["hidden_size"] // VISION_HEAD_DIM
    if "merge_size" not in cfg:
        units = _shape(shapes, "visual.merger.linear_fc1.weight", path)[1] // cfg["hidden_size"]
        cfg["merge_size"] = math.isqrt(units)
        if cfg["merge_size"] ** 2 != units:
            raise CheckpointError(f"{path}: cannot tell the vision merge size from the merger; {HINT}")
    mergers = _count(shapes, "visual.deepstack_merger_list.")
    if "deepstack_layers" not in cfg:
        if DEEPSTACK.get(cfg["depth"], ()) and len(DEEPSTACK[cfg["depth"]]) == mergers:
            cfg["deepstack_layers"] = DEEPSTACK[cfg["depth"]]
        elif mergers:
            raise CheckpointError(
                f"{path}: cannot tell which of the {cfg['depth']} vision blocks feed the {mergers} DeepStack "
                f"mergers; {HINT}"
            )
        else:
            cfg["deepstack_layers"] = ()
    elif len(cfg["deepstack_layers"]) != mergers:
        raise CheckpointError(
            f"{path}: {len(cfg['deepstack_layers'])} DeepStack layers configured, {mergers} mergers in the file"
        )
    return cfg
