"""Tiny random Qwen2.5-VL text encoders, written in the layouts of the real files.

The reference is transformers' `Qwen2_5_VLForConditionalGeneration` built from a tiny config with the
real vocabulary (152064, so the real tokenizer's special ids exist), 128-wide text heads with the real
M-RoPE sections, 80-wide vision heads and 8 vision blocks (block 7 attends over the whole image, as
every 8th block of the real tower). Every parameter is re-drawn from a seed (norms around 1, biases
non-zero) so that no part of the computation is trivially the identity.

Layouts written:
* `write_comfy_single`: ComfyUI's `qwen_2.5_vl_7b.safetensors` (legacy names, bf16), optionally under
  the `text_encoders.qwen25_7b.transformer.` prefix inside a full checkpoint, optionally without `visual.*`
* `write_comfy_fp8_scaled`: ComfyUI's `qwen_2.5_vl_7b_fp8_scaled.safetensors` (float8 Linear weights with a
  float32 `scale_weight` each, a `scaled_fp8` marker, everything else bf16)
* `write_hf_folder`: a diffusers `text_encoder/` folder, sharded with `model.safetensors.index.json`, in
  legacy or transformers-5 names, with `config.json`
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_TEXT = dict(
    vocab_size=152064,
    hidden_size=256,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
)
TINY_VISION = dict(
    depth=8, hidden_size=160, intermediate_size=64, num_heads=2, out_hidden_size=256, fullatt_block_indexes=[7]
)
FULL_PREFIX = "text_encoders.qwen25_7b.transformer."


def reference_config(text: dict | None = None, vision: dict | None = None):
    from transformers import Qwen2_5_VLConfig  # noqa: PLC0415

    t, v = tiny_sizes(TINY_TEXT, TINY_VISION, text, vision)
    return Qwen2_5_VLConfig(text_config=t, vision_config=v)


def tiny_sizes(tiny_text: dict, tiny_vision: dict, text: dict | None, vision: dict | None) -> tuple[dict, dict]:
    """(text, vision) config fields: the tiny ones with the given changes; the tower projects to the text width."""
    t = {**tiny_text, **(text or {})}
    v = {**tiny_vision, **(vision or {})}
    v["out_hidden_size"] = t["hidden_size"]
    return t, v


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter: weights ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.2), biases ~ N(0, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if p.ndim == 1 and ("norm" in name or "ln_q" in name):
            p.copy_(1 + 0.2 * r)
        elif p.ndim == 1:
            p.copy_(0.2 * r)
        elif "embed_tokens" in name:
            p.copy_(r)
        else:
            p.copy_(r / p[0].numel() ** 0.5)
    return model


def reference_model(
    seed: int = 0, text: dict | None = None, vision: dict | None = None, cls=None, exact_in=torch.bfloat16
):
    """transformers' Qwen2.5-VL (fp32, eval) with seeded random weights; `cls` may be a subclass of it.

    With `exact_in` (default bf16) every weight is a value that dtype represents exactly, so the model
    and a file stored in that dtype hold the same numbers.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415

    torch.manual_seed(seed)
    model = (cls or Qwen2_5_VLForConditionalGeneration)(reference_config(text, vision)).eval()
    return randomize_exact_(model, seed, exact_in)


@torch.no_grad()
def randomize_exact_(model: torch.nn.Module, seed: int, exact_in: torch.dtype | None) -> torch.nn.Module:
    """`randomize_`, then (unless `exact_in` is None) every weight rounded to a value `exact_in` holds exactly."""
    randomize_(model, seed)
    if exact_in is not None:
        for p in model.parameters():
            p.copy_(p.to(exact_in).float())
    return model


def legacy_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under the legacy names the real files use (`model.*`, `visual.*`, `lm_head.*`)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model.") :]
        elif k.startswith("model.visual."):
            k = "visual." + k[len("model.visual.") :]
        out[k] = v.detach().clone().contiguous()
    return out


def to_transformers5_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model.") :]
        out[k] = v
    return out


def is_linear_weight(name: str, t: torch.Tensor) -> bool:
    """Weights ComfyUI's scaled-fp8 files store in float8: every Linear layer except lm_head."""
    return t.ndim == 2 and name.endswith(".weight") and "embed_tokens" not in name and not name.startswith("lm_head")


def rounded(sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The state dict as stored in `dtype`, back in float32 (what a loader computes with)."""
    return {k: v.to(dtype).float() for k, v in sd.items()}


def write_comfy_single(
    path, sd: dict[str, torch.Tensor], dtype=torch.bfloat16, prefix: str = "", vision: bool = True, lm_head: bool = True
) -> Path:
    """A ComfyUI-style single file; `prefix=FULL_PREFIX` puts it inside a (fake) full checkpoint."""
    out = {}
    for k, v in sd.items():
        if (not vision and k.startswith("visual.")) or (not lm_head and k.startswith("lm_head.")):
            continue
        out[prefix + k] = v.to(dtype).contiguous()
    if prefix:  # other components of a full checkpoint
        out["model.diffusion_model.txt_in.weight"] = torch.zeros(8, 8, dtype=dtype)
        out["vae.decoder.conv_in.weight"] = torch.zeros(4, 4, 1, 1, dtype=dtype)
    path = Path(path)
    save_file(out, str(path))
    return path


def write_comfy_fp8_scaled(
    path, sd: dict[str, torch.Tensor], spelling: str = "scale_weight"
) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled-fp8 text-encoder file; returns the dequantised weights (float32) it represents."""
    out, dequantised = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in sd.items():
        if is_linear_weight(k, v):
            scale = (v.abs().max().float() / 448.0).clamp(min=1e-12)
            q = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k] = q
            out[k[: -len("weight")] + spelling] = scale.reshape(())
            dequantised[k] = q.float() * scale
        else:
            out[k] = v.to(torch.bfloat16).contiguous()
            dequantised[k] = out[k].float()
    save_file(out, str(path))
    return dequantised


def write_hf_folder(folder, model, naming: str = "legacy", shards: int = 3, dtype=torch.bfloat16) -> Path:
    """A diffusers/HF `text_encoder/` folder: config.json + shards + model.safetensors.index.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(dtype) for k, v in legacy_state_dict(model).items()}
    if naming == "transformers5":
        sd = to_transformers5_names(sd)
    keys = sorted(sd)
    weight_map, size = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
        size += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    model.config.save_pretrained(str(folder))
    return folder
