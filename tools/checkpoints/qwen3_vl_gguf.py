"""Tiny Qwen3-VL encoders (Qwen-Image-2.1) as llama.cpp GGUF files (a language model and its mmproj), and the test
oracle.

Written with the `gguf` package (a test dependency) the way llama.cpp's convert_hf_to_gguf.py writes Qwen3-VL
(Qwen3VLTextModel, Qwen3VLVisionModel): language-model names by gguf's own TensorNameMap (MODEL_ARCH.QWEN3VL),
vision names by MODEL_ARCH.MMPROJ's map where the converter uses it (blocks, patch bias, position table) and
as the converter names the rest (the Conv3d patch embedding split into its two temporal slices `v.patch_embd.
weight` / `.weight.1`; the merger as `v.post_ln`, `mm.0`, `mm.2`; DeepStack merger k as `v.deepstack.<block>.
{norm, fc1, fc2}`, block = deepstack_visual_indexes[k]); the vision qkv stays fused. Metadata: `qwen3vl.*` with
`rope.dimension_sections` padded to 4, `attention.key_length` and `n_deepstack_layers`; `clip.*` with
`clip.projector_type` "qwen3vl_merger", `image_size` (the position grid times the patch), `spatial_merge_size`
and `is_deepstack_layers`. Tensor types and values as `tools.checkpoints.qwen_vl_gguf` writes them (llama-quantize's
rules, gguf's quantisers or random k-quant blocks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import gguf
import torch

from tools.checkpoints import gguf as G
from tools.checkpoints.qwen3_vl import legacy_state_dict
from tools.checkpoints.qwen_vl_gguf import _add, _metadata, stored_bytes, text_metadata, write_language_model

__all__ = ["reference_weights", "stored_bytes", "text_names", "vision_parts", "write_mmproj", "write_text"]

QWEN3_MEAN = QWEN3_STD = [0.5, 0.5, 0.5]  # Qwen3-VL's preprocessor_config.json
PATCH = "v.patch_embd.weight"  # + ".1": the second temporal slice
MERGER = {"norm": "v.post_ln", "linear_fc1": "mm.0", "linear_fc2": "mm.2"}
DEEPSTACK = {"norm": "norm", "linear_fc1": "fc1", "linear_fc2": "fc2"}


def text_names(sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{GGUF name: canonical name} of the language model's tensors (lm_head included), by gguf's tensor map."""
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3VL, layers)
    return {names.get_name(k, try_suffixes=(".weight", ".bias")): k for k in sd if k.startswith(("model.", "lm_head."))}


def vision_parts(sd: Mapping[str, torch.Tensor], deepstack: list[int]) -> dict[str, tuple[list[str], int, bool]]:
    """{canonical name: (GGUF names, dim, stacked)} of the vision tower, as the converter names and splits it."""
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("visual.blocks."))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, depth)
    out = {}
    for k in sd:
        if not k.startswith("visual."):
            continue
        parts = k.split(".")
        if k == "visual.patch_embed.proj.weight":
            out[k] = ([PATCH, PATCH + ".1"], 2, True)
        elif parts[1] == "merger":
            out[k] = ([f"{MERGER[parts[2]]}.{parts[3]}"], 0, False)
        elif parts[1] == "deepstack_merger_list":
            out[k] = ([f"v.deepstack.{deepstack[int(parts[2])]}.{DEEPSTACK[parts[3]]}.{parts[4]}"], 0, False)
        else:
            out[k] = ([names.get_name(k, try_suffixes=(".weight", ".bias"))], 0, False)
    return out


def write_text(
    path, model, qtype: str = "Q8_0", seed: int = 0, *, types: Mapping[str, str] = {}, lm_head: bool = True,
    arch: str = "qwen3vl", name: str = "Qwen3 VL 8B Instruct", metadata: Mapping[str, object] = {},
) -> Path:  # fmt: skip
    """The language model of `model` (transformers' Qwen3-VL, see tools.checkpoints.qwen3_vl) as llama.cpp's
    `<arch>` GGUF of file type `qtype`. `metadata`: keys to change (a value) or drop (None) after the real ones."""
    sd, t = legacy_state_dict(model), model.config.text_config
    real = {
        **text_metadata(arch, name, t), f"{arch}.attention.key_length": t.head_dim,
        f"{arch}.attention.value_length": t.head_dim,
        f"{arch}.n_deepstack_layers": len(model.config.vision_config.deepstack_visual_indexes),
    }  # fmt: skip
    return write_language_model(path, sd, text_names(sd), arch, real, qtype, types=types, lm_head=lm_head, seed=seed,
                                metadata=metadata)  # fmt: skip


def write_mmproj(
    path, model, qtype: str = "F16", seed: int = 0, *, types: Mapping[str, str] = {},
    metadata: Mapping[str, object] = {}, drop: tuple[str, ...] = (),
) -> Path:  # fmt: skip
    """The vision tower, merger and DeepStack mergers of `model` as llama.cpp's mmproj GGUF (architecture "clip");
    `drop`: tensors left out."""
    sd, v = legacy_state_dict(model), model.config.vision_config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch="clip")
    flags = [i in v.deepstack_visual_indexes for i in range(v.depth)]
    real = {
        "general.type": "mmproj", "clip.has_vision_encoder": True, "clip.projector_type": "qwen3vl_merger",
        "clip.vision.projection_dim": model.config.text_config.hidden_size,
        "clip.vision.image_size": math.isqrt(v.num_position_embeddings) * v.patch_size,
        "clip.vision.patch_size": v.patch_size, "clip.vision.embedding_length": v.hidden_size,
        "clip.vision.feed_forward_length": v.intermediate_size, "clip.vision.block_count": v.depth,
        "clip.vision.attention.head_count": v.num_heads, "clip.vision.image_mean": QWEN3_MEAN,
        "clip.vision.image_std": QWEN3_STD, "clip.use_gelu": True,
        "clip.vision.spatial_merge_size": v.spatial_merge_size,
        "clip.vision.attention.layer_norm_epsilon": model.config.text_config.rms_norm_eps,
        "clip.vision.is_deepstack_layers": flags,
    }  # fmt: skip
    _metadata(writer, {**real, **metadata})
    writer.add_file_type(gguf.LlamaFileType[G.FILE_TYPES[qtype]])
    for legacy, (keys, dim, stacked) in vision_parts(sd, v.deepstack_visual_indexes).items():
        t = sd[legacy]
        pieces = t.unbind(dim) if stacked else [t]
        for key, piece in zip(keys, pieces, strict=True):
            if key not in drop:
                _add(writer, key, piece, qtype, types, seed)
    G.finish(writer)
    return path


def reference_weights(text: Path, mmproj: Path | None, model) -> dict[str, torch.Tensor]:
    """The float32 weights the files mean, canonically named (lm_head dropped): gguf's own reader and
    dequantisers (`gguf.dequantized`), the converter's split undone by this writer's own maps."""
    sd = legacy_state_dict(model)
    values = G.dequantized(text)
    out = {legacy: values[key] for key, legacy in text_names(sd).items() if not legacy.startswith("lm_head.")}
    if mmproj is not None:
        values = G.dequantized(mmproj)
        for legacy, (keys, dim, stacked) in vision_parts(
            sd, model.config.vision_config.deepstack_visual_indexes
        ).items():
            parts = [values[k] for k in keys]
            out[legacy] = torch.stack(parts, dim) if stacked else parts[0]
    return out
