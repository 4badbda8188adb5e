"""Tiny random Qwen-Image-2.1 DiT checkpoints in the real layouts, for tests and benchmarks.

Layouts: Comfy-Org single file (`qwen_image_2.1_bf16`: ComfyUI names with the fused `img_mlp.gate_up`,
optional `model.diffusion_model.` prefix), its comfy_quant twin (`..._int8_convrot`: the block linears as
int8 + per-row scales with ConvRot, `<layer>.comfy_quant` markers), a GGUF file with the same names (or with the
SwiGLU split, `split_mlp`), and the diffusers `transformer/` folder (split `gate_layer` / `proj`, config.json;
optionally in a repo folder).
Single files of sizes the shapes do not tell carry their config as safetensors metadata `config`.
Values: `dit.random_tensor` per key name and seed (the same weights in every layout).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from qwen_image_core.formats.dit21 import FUSED_MLP, GGUF_CONFIG_KEY, SPLIT_MLP
from qwen_image_core.qwen21.dit import DiT21, DiT21Config
from tools.checkpoints import dit as D

PREFIX = D.PREFIX
# 3 heads x 32 channels, SwiGLU 3 x 96, text width 40, RoPE (4, 14, 14): every code path, fast
TINY = dict(num_layers=2, num_heads=3, head_dim=32, mlp_dim=288, text_dim=40, rope_axes=(4, 14, 14))
# widths in whole 256-groups (ConvRot, k-quant super-blocks) with the real 128-channel heads: no config needed
QUANT_TINY = dict(num_layers=2, num_heads=2, head_dim=128, mlp_dim=768, text_dim=256)


def tiny_config(**kw) -> DiT21Config:
    return DiT21Config(**{**TINY, **kw})


def quant_config(**kw) -> DiT21Config:
    return DiT21Config(**{**QUANT_TINY, **kw})


def shapes(cfg: DiT21Config) -> dict[str, tuple[int, ...]]:
    """ComfyUI names (fused gate_up, no prefix) and shapes."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in DiT21(cfg).state_dict().items()}


def state_dict(cfg: DiT21Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """The float32 random weights under ComfyUI's names."""
    return {k: D.random_tensor(k, s, seed) for k, s in shapes(cfg).items()}


def diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI names -> diffusers' (gate_up split into gate_layer and proj, gate rows first)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(FUSED_MLP):
            base = k.removesuffix(FUSED_MLP)
            out[base + SPLIT_MLP[0]], out[base + SPLIT_MLP[1]] = v.chunk(2, dim=0)
        else:
            out[k] = v
    return out


def diffusers_config(cfg: DiT21Config) -> dict:
    """The transformer config.json diffusers writes (kwargs of QwenImage21Transformer2DModel)."""
    return {
        "_class_name": "QwenImage21Transformer2DModel",
        "patch_size": 1,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.num_layers,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "context_in_dim": cfg.text_dim,
        "mlp_ratio": cfg.mlp_dim // cfg.hidden,
        "axes_dims_rope": list(cfg.rope_axes),
        "eps": cfg.eps,
        "causal_condition": cfg.causal_condition,
    }


def config_metadata(cfg: DiT21Config) -> dict[str, str] | None:
    """The `config` metadata a single file of sizes its shapes do not tell carries."""
    if cfg.head_dim == 128 and cfg.rope_axes == (16, 56, 56):
        return None
    return {"config": json.dumps({"transformer": diffusers_config(cfg)})}


def write_comfy(path, cfg: DiT21Config, seed=0, dtype=torch.bfloat16, prefix="") -> Path:
    """Comfy-Org single file (`qwen_image_2.1_bf16.safetensors`)."""
    entries = [(prefix + k, s, dtype, lambda k=k, s=s: D.random_tensor(k, s, seed)) for k, s in shapes(cfg).items()]
    return D.write_safetensors(Path(path), entries, config_metadata(cfg))


def write_comfy_quant(path, cfg: DiT21Config, fmt="int8_convrot", seed=0, prefix="", plain=torch.bfloat16) -> Path:
    """Comfy-Org quantised file (`qwen_image_2.1_int8_convrot.safetensors`): block linears in `fmt` with a
    `comfy_quant` marker each, everything else `plain`."""
    from safetensors.torch import save_file  # noqa: PLC0415

    from tools.checkpoints import comfy_quant as CQ  # noqa: PLC0415

    out = {}
    for k, s in shapes(cfg).items():
        w = D.random_tensor(k, s, seed)
        if not (k.startswith("transformer_blocks.") and D.is_linear_weight(k, s) and CQ.fits(fmt, s)):
            out[prefix + k] = w.to(plain)
            continue
        layer = prefix + k.removesuffix(".weight")
        tensors, conf = CQ.quantise(fmt, w)
        out.update({f"{layer}.{suffix}": t.contiguous() for suffix, t in tensors.items()})
        out[layer + ".comfy_quant"] = CQ.marker(conf)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=config_metadata(cfg))
    return path


def write_gguf(path, cfg: DiT21Config, qtype="Q8_0", seed=0, prefix="", arch="qwen_image", split_mlp=False) -> Path:
    """A GGUF 2.1 DiT (ComfyUI names, types as ComfyUI-GGUF's convert.py gives them); `split_mlp`: the SwiGLU as
    diffusers' `gate_layer` / `proj` halves of the same weights (as some third-party GGUF exports store it), each
    quantised on its own."""
    import gguf  # noqa: PLC0415

    from tools.checkpoints import gguf as G  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch=arch, dry_run=False)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType[G.FILE_TYPES[qtype]])
    meta = config_metadata(cfg)
    if meta:
        writer.add_string(GGUF_CONFIG_KEY, meta["config"])
    for name, shape in shapes(cfg).items():
        if split_mlp and name.endswith(FUSED_MLP):
            base, half = name.removesuffix(FUSED_MLP), (shape[0] // 2, shape[1])
            gate, up = D.random_tensor(name, shape, seed).numpy().reshape(2, *half)
            for suffix, x in zip(SPLIT_MLP, (gate, up), strict=True):
                t = G.tensor_type(base + suffix, half, qtype)
                data = x if t == "F32" else x.astype(np.float16) if t == "F16" else gguf.quants.quantize(
                    np.ascontiguousarray(x), gguf.GGMLQuantizationType[t])  # fmt: skip
                writer.add_tensor(
                    prefix + base + suffix, np.ascontiguousarray(data), raw_dtype=gguf.GGMLQuantizationType[t]
                )
            continue
        t = G.tensor_type(name, shape, qtype)
        data = G.encode(name, shape, t, seed)
        writer.add_tensor(prefix + name, np.ascontiguousarray(data), raw_dtype=gguf.GGMLQuantizationType[t])
    G.finish(writer)
    return path


def write_diffusers(folder, cfg: DiT21Config, seed=0, dtype=torch.bfloat16, shards=2, repo=False) -> Path:
    """A diffusers `transformer/` folder (split SwiGLU names, config.json, shards + index); `repo=True` wraps it."""
    root = Path(folder)
    tdir = root / "transformer" if repo else root
    sd = diffusers_state_dict({k: torch.empty(s, device="meta") for k, s in shapes(cfg).items()})
    fused = state_dict(cfg, seed)
    values = diffusers_state_dict(fused)
    entries = [(k, tuple(t.shape), dtype, lambda k=k: values[k]) for k, t in sd.items()]
    per = -(-len(entries) // shards)
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {}
    for i, name in enumerate(names):
        part = entries[i * per : (i + 1) * per]
        D.write_safetensors(tdir / name, part)
        weight_map.update({e[0]: name for e in part})
    index = {"metadata": {"total_size": sum(f.stat().st_size for f in tdir.glob("*.safetensors"))}}
    index["weight_map"] = weight_map
    (tdir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tdir / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2))
    if repo:
        (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImage21Pipeline"}))
    return root


def meta_model(cfg: DiT21Config | None = None) -> DiT21:
    """A weightless bf16 2.1 DiT on the meta device (the real 7B shapes by default), for planners."""
    with torch.device("meta"):
        return DiT21(cfg or DiT21Config()).to(torch.bfloat16)
