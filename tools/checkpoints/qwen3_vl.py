"""Tiny random Qwen3-VL condition encoders (Qwen-Image-2.1), written in the layouts of the real files.

The reference is transformers' `Qwen3VLForConditionalGeneration` built from a tiny config with the real
vocabulary (151936, so the tokenizer's special ids exist), 128-wide text heads with the real interleaved M-RoPE
sections (24, 20, 20), 3 decoder layers, and a 5-block vision tower with 16-px patches, an 8 x 8 learned
position grid (smaller than the test images, so the bilinear resampling is exercised) and DeepStack at blocks
1 and 3. Every parameter is re-drawn from a seed (`qwen_vl.randomize_`), bf16-exact by default.

Layouts written (the canonical names are ComfyUI's module names, `model.*` / `visual.*`; the HF folder uses
transformers' `model.language_model.*` / `model.visual.*`):
* `write_single`: a single bf16 file (optionally without `visual.*` or with `lm_head`), as `qwen3vl_8b_bf16`
* `write_quantised`: the language model's linears in a comfy_quant format (`int8_convrot` as
  `qwen3vl_8b_int8_convrot`, `asym_w4a8_int8` as `qwen3vl_8b_w4a8`), via `comfy_quant.write_text_encoder`
* `write_hf_folder`: a diffusers `text_encoder/` folder (config.json + shards + index), either naming
`layout="comfy"` (single and quantised files) writes the names of Comfy-Org's `qwen3vl_8b_*` files as they are
on disk: the language model as `model.*`, the vision tower as `model.visual.*` and the generation head as a top-level
`lm_head.weight` (quantised like the linears in a quantised file), which ComfyUI's loader renames (`model.visual.` ->
`visual.`, `lm_head.` -> `model.lm_head.`) to its modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import comfy_quant
from .qwen_vl import legacy_state_dict, randomize_exact_, tiny_sizes, write_hf_folder

__all__ = ["comfy_names", "legacy_state_dict", "reference_model", "write_hf_folder", "write_quantised", "write_single"]

TINY_TEXT = dict(
    vocab_size=151936,
    hidden_size=256,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 5e6,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
)
TINY_VISION = dict(
    depth=5,
    hidden_size=64,
    intermediate_size=96,
    num_heads=2,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    num_position_embeddings=64,
    deepstack_visual_indexes=[1, 3],
    out_hidden_size=256,
)


def reference_config(text: dict | None = None, vision: dict | None = None):
    from transformers import Qwen3VLConfig  # noqa: PLC0415

    t, v = tiny_sizes(TINY_TEXT, TINY_VISION, text, vision)
    return Qwen3VLConfig(text_config=t, vision_config=v)


def reference_model(seed: int = 0, text: dict | None = None, vision: dict | None = None, exact_in=torch.bfloat16):
    """transformers' Qwen3-VL (fp32, eval, sdpa) with seeded random weights, `exact_in`-representable."""
    from transformers import Qwen3VLForConditionalGeneration  # noqa: PLC0415

    torch.manual_seed(seed)
    cfg = reference_config(text, vision)
    cfg._attn_implementation = "sdpa"
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    return randomize_exact_(model, seed, exact_in)


LAYOUTS = ("canonical", "comfy")


def comfy_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical names -> the names in Comfy-Org's files (the vision tower under `model.visual.`)."""
    return {("model." + k if k.startswith("visual.") else k): v for k, v in sd.items()}


def write_single(
    path, model, vision: bool = True, lm_head: bool = False, dtype=torch.bfloat16, config: bool = True,
    layout: str = "canonical",
) -> Path:  # fmt: skip
    """A single file (`model.*`, `visual.*`), bf16 by default; `config`: the tiny model's config.json in the file's
    `config` metadata (its head widths and DeepStack layers are not the 8B's); `layout="comfy"`: Comfy-Org's names
    (`model.visual.*`, with `lm_head.weight`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    lm_head = lm_head or layout == "comfy"
    sd = legacy_state_dict(model)
    out = {k: v.to(dtype).contiguous() for k, v in sd.items()
           if (vision or not k.startswith("visual.")) and (lm_head or not k.startswith("lm_head."))}  # fmt: skip
    out = comfy_names(out) if layout == "comfy" else out
    meta = {"config": json.dumps({"text_encoder": model.config.to_dict()})} if config else None
    save_file(out, str(path), metadata=meta)
    return Path(path)


def write_quantised(path, model, fmt: str = "int8_convrot", embedding: str | None = None,
                    layout: str = "canonical") -> Path:  # fmt: skip
    """The language model's linears in comfy_quant `fmt` (ConvRot where inputs split into 256s), the rest bf16,
    with the tiny model's config in the metadata; `layout="comfy"`: Comfy-Org's names, `lm_head` quantised in
    `fmt` too (plain int8 where ConvRot does not fit, as the writer does for the linears)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    sd = legacy_state_dict(model)
    path = comfy_quant.write_text_encoder(path, sd, fmt, embedding)
    tensors = load_file(str(path))
    if layout == "comfy":
        tensors = comfy_names(tensors)
        head = sd["lm_head.weight"]
        f = fmt if comfy_quant.fits(fmt, tuple(head.shape)) else "int8_tensorwise"
        packed, conf = comfy_quant.quantise(f, head)
        tensors.update({f"lm_head.{suffix}": t.contiguous() for suffix, t in packed.items()})
        tensors["lm_head.comfy_quant"] = comfy_quant.marker(conf)
    save_file(tensors, str(path), metadata={"config": json.dumps({"text_encoder": model.config.to_dict()})})
    return path
