"""Tiny random files with ComfyUI's quantised layers (`<layer>.comfy_quant` JSON + the format's tensors), in the
layouts ComfyUI's loader reads (`comfy/ops.py _load_quantized_module`), quantised with comfy-kitchen's own
quantisers where it has them (every format but awq_w4a16, which kitchen only loads: quantised here per group
of 64 with a min / max grid, as AWQ's zero points are floating).

`quantise(fmt, w)` gives one layer's tensors ({suffix: tensor}, suffixes after `<layer>.`) and its marker JSON;
`write_dit` writes a DiT file with chosen layers in chosen formats (mixed per layer; the others bf16), e.g. the
layout of Comfy-Org's `qwen_image_edit_2511_int8_convrot` (every block linear int8 with per-row float32 scales
after a group-256 ConvRot, `__index_timestep_zero__`); `write_text_encoder` does the same for a Qwen2.5-VL
state dict (the token embedding may be int8 / fp8 as well).

The oracle side: `kitchen_weights(path)` gives the float32 weights a file means, read the way ComfyUI's loader
reads it and dequantised by comfy-kitchen's own layout classes (`kitchen_weight`: one layer).

Needs comfy-kitchen (a test-only dependency).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qwen_image_core.mmdit import MMDiTConfig

from . import dit as D

# hidden 256 = 2 heads x 128 (the real head width, so sizes come from the shapes), every block linear's
# input a multiple of 256 (ConvRot groups)
TINY = dict(num_layers=2, num_heads=2, head_dim=128, mlp_dim=512, text_dim=256)
FORMATS = (
    "float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "int8_convrot", "nvfp4", "mxfp8", "asym_w4a8_int8",
    "awq_w4a16", "convrot_w4a4",
)  # fmt: skip
ROTATED = ("int8_convrot", "asym_w4a8_int8", "convrot_w4a4")  # need input channels in groups of 256


def tiny_config(**kw) -> MMDiTConfig:
    return MMDiTConfig(**{**TINY, **kw})


def marker(conf: Mapping) -> torch.Tensor:
    return torch.tensor(list(json.dumps(dict(conf)).encode()), dtype=torch.uint8)


def fits(fmt: str, shape: tuple[int, int]) -> bool:
    """Whether a [out, in] weight can be stored in `fmt` (ConvRot groups of 256, AWQ groups of 64)."""
    k = shape[1]
    return k % 256 == 0 if fmt in ROTATED else k % 64 == 0 if fmt == "awq_w4a16" else True


def quantise(
    fmt: str,
    w: torch.Tensor,
    input_scale: bool = False,
    pre_quant: bool = False,
    legacy_u8: bool = False,
    in_params: bool = False,
    full_precision: bool = False,
    **kw,
) -> tuple[dict[str, torch.Tensor], dict]:
    """One layer in `fmt` (FORMATS; "int8_convrot" = int8_tensorwise with ConvRot 256): ({suffix: tensor}, marker).

    input_scale: also store a static activation scale (fp8 / nvfp4 / mxfp8); pre_quant: an nvfp4 layer with
    ModelOpt's `pre_quant_scale` (the weight quantised is w / pre_quant_scale, so the layer still means w);
    legacy_u8: fp8 bytes stored as uint8; in_params: flags under `params`; full_precision: the flag
    `full_precision_matrix_mult`. `kw` goes to kitchen's quantiser (e.g. codebook=False, bits=6 for w4a8); for
    int8, per_channel=False stores one scale, flat_scale=True per-row scales as [N] instead of kitchen's [N, 1].
    """
    from comfy_kitchen import tensor as ck  # noqa: PLC0415

    w = w.float()
    flags: dict = {}
    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        q, p = ck.TensorCoreFP8Layout.quantize(w, dtype=getattr(torch, fmt))
        out = {"weight": q.view(torch.uint8) if legacy_u8 else q, "weight_scale": p.scale.reshape(())}
    elif fmt in ("int8_tensorwise", "int8_convrot"):
        rot = fmt == "int8_convrot"
        q, p = ck.TensorWiseINT8Layout.quantize(w, per_channel=kw.get("per_channel", True) or rot, convrot=rot)
        scale = (
            p.scale.reshape(-1) if kw.get("flat_scale") and p.scale.numel() > 1 else p.scale
        )  # [N] or kitchen's [N, 1]
        out, fmt = {"weight": q, "weight_scale": scale}, "int8_tensorwise"
        flags = {"convrot": True, "convrot_groupsize": 256, "per_row": True} if rot else {"convrot": False}
    elif fmt == "nvfp4":
        pqs = (torch.rand(w.shape[1], generator=torch.Generator().manual_seed(w.shape[0])) + 0.5) if pre_quant else None
        q, p = ck.TensorCoreNVFP4Layout.quantize(w / pqs if pre_quant else w)
        out = {"weight": q, "weight_scale": p.block_scale, "weight_scale_2": p.scale.reshape(())}
        if pre_quant:
            out["pre_quant_scale"] = pqs.to(torch.bfloat16)
    elif fmt == "mxfp8":
        q, p = ck.TensorCoreMXFP8Layout.quantize(w)
        out = {"weight": q, "weight_scale": p.scale}
    elif fmt == "asym_w4a8_int8":
        q, p = ck.AsymW4A8Int8Layout.quantize(w, **kw)
        out = {"weight": q, "weight_s_rel": p.scale, "weight_s_channel": p.s_channel}
        if p.codebook is not None:
            out["weight_codebook"] = p.codebook
        if p.correction is not None:
            out["weight_correction"] = p.correction
        flags = {"group_size": p.group_size, "convrot_groupsize": p.convrot_groupsize}
    elif fmt == "awq_w4a16":
        out, flags = _awq(w), {"group_size": 64}
    elif fmt == "convrot_w4a4":
        q, p = ck.TensorCoreConvRotW4A4Layout.quantize(w)
        out, flags = {"weight": q, "weight_scale": p.scale}, {"convrot_groupsize": 256}
    else:
        raise ValueError(f"unknown format {fmt}")
    if input_scale and fmt in ("float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8"):
        out["input_scale"] = torch.tensor(0.02)
    conf = {"format": fmt, **({"params": flags} if in_params and flags else flags)}
    if full_precision:
        conf["full_precision_matrix_mult"] = True
    return out, conf


def _awq(w: torch.Tensor, group: int = 64) -> dict[str, torch.Tensor]:
    n, k = w.shape
    g = w.view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16)
    zeros = (lo + 8 * scale.float()).to(torch.bfloat16)  # W = (q - 8) * scale + zeros
    q = ((g - lo.unsqueeze(-1)) / scale.float().unsqueeze(-1)).round().clamp(0, 15).to(torch.int32).view(n, k)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return {"weight": packed, "weight_scale": scale.t().contiguous(), "weight_zeros": zeros.t().contiguous()}


def block_linears(name: str, shape: tuple[int, ...]) -> bool:
    """The layers Comfy-Org's quantised DiTs quantise: the linear layers of the transformer blocks."""
    return name.startswith("transformer_blocks.") and D.is_linear_weight(name, shape)


def write_dit(
    path,
    cfg: MMDiTConfig,
    fmt: str | Callable[[str, tuple], str | None] = "int8_convrot",
    seed: int = 0,
    zero_cond_t: bool = False,
    header: bool = False,
    plain=torch.bfloat16,
    **options,
) -> Path:
    """A DiT file: each block linear in `fmt` (a format, or name, shape -> format / None), the rest `plain`.

    header: list the layers in the `_quantization_metadata` safetensors header instead of `comfy_quant`
    tensors (the older layout). `options` go to `quantise`.
    """
    choose = fmt if callable(fmt) else lambda name, shape: fmt if block_linears(name, shape) else None
    out, layers = {}, {}
    for k, s in D.shapes(cfg).items():
        w = D.random_tensor(k, s, seed)
        f = choose(k, s) if len(s) == 2 else None
        if f is None or not fits(f, s):
            out[k] = w.to(plain)
            continue
        layer = k.removesuffix(".weight")
        tensors, conf = quantise(f, w, **options)
        out.update({f"{layer}.{suffix}": t.contiguous() for suffix, t in tensors.items()})
        if header:
            layers[layer] = conf
        else:
            out[layer + ".comfy_quant"] = marker(conf)
    if zero_cond_t:
        out["__index_timestep_zero__"] = torch.empty(0, dtype=torch.bfloat16)
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if header else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=D.config_metadata(cfg, meta))
    return path


def te_linears(name: str, t: torch.Tensor) -> bool:
    """The language model's linear layers (what an int8 text-encoder file quantises)."""
    return name.startswith("model.layers.") and t.ndim == 2 and name.endswith(".weight")


def write_text_encoder(
    path,
    sd: Mapping[str, torch.Tensor],
    fmt: str | Callable = "int8_convrot",
    embedding: str | None = "int8_convrot",
    **options,
) -> Path:
    """A Qwen2.5-VL file (legacy names, lm_head dropped): language-model linears in `fmt` (or name -> format,
    ConvRot only where the inputs split into 256s, else plain int8 marked `convrot: false`), the token
    embedding in `embedding` (int8 / int8_convrot / float8_e4m3fn, None: bf16), the rest bf16."""
    choose = fmt if callable(fmt) else lambda name, t: fmt if te_linears(name, t) else None
    out = {}
    for k, v in sd.items():
        if k.startswith("lm_head."):
            continue
        f = embedding if k == "model.embed_tokens.weight" else choose(k, v)
        if f is not None and not fits(f, tuple(v.shape)):
            f = "int8_tensorwise" if f == "int8_convrot" else None
        if f is None:
            out[k] = v.to(torch.bfloat16).contiguous()
            continue
        layer = k.removesuffix(".weight")
        tensors, conf = quantise(f, v, **options)
        out.update({f"{layer}.{suffix}": t.contiguous() for suffix, t in tensors.items()})
        out[layer + ".comfy_quant"] = marker(conf)
    save_file(out, str(path))
    return Path(path)


# -- the oracle: what a file means to ComfyUI's loader + comfy-kitchen's dequantisation
# kitchen layout class per format, and the storage dtype ComfyUI gives the weight (QUANT_ALGOS storage_t)
LAYOUTS = {
    "float8_e4m3fn": ("TensorCoreFP8Layout", torch.float8_e4m3fn),
    "float8_e5m2": ("TensorCoreFP8Layout", torch.float8_e5m2),
    "int8_tensorwise": ("TensorWiseINT8Layout", torch.int8),
    "nvfp4": ("TensorCoreNVFP4Layout", torch.uint8),
    "mxfp8": ("TensorCoreMXFP8Layout", torch.float8_e4m3fn),
    "asym_w4a8_int8": ("AsymW4A8Int8Layout", torch.int8),
    "awq_w4a16": ("TensorCoreAWQW4A16Layout", torch.int8),
    "convrot_w4a4": ("TensorCoreConvRotW4A4Layout", torch.int8),
}


def kitchen_weight(conf: dict, t: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """One layer's float32 weight as ComfyUI's loader + comfy-kitchen compute it (`t`: suffix -> tensor)."""
    from comfy_kitchen.tensor import QuantizedTensor, get_layout_class  # noqa: PLC0415

    fmt, params = conf["format"], conf.get("params", {})

    def flag(name, default):
        return conf.get(name, params.get(name, default))

    layout, storage = LAYOUTS[fmt]
    w = t["weight"]
    w = w.view(storage) if w.dtype == torch.uint8 and storage.is_floating_point else w.to(storage)
    if fmt.startswith("float8"):
        p = {"scale": t["weight_scale"].float()}
    elif fmt == "int8_tensorwise":
        s = t["weight_scale"]  # per row as [N] or [N, 1] (kitchen's int8_linear reads both as per row)
        p = {"scale": s.reshape(-1, 1) if s.ndim == 1 and s.numel() > 1 else s}
        if flag("convrot", False):
            p.update(convrot=True, convrot_groupsize=int(flag("convrot_groupsize", 256)))
    elif fmt == "nvfp4":
        p = {"scale": t["weight_scale_2"], "block_scale": t["weight_scale"].view(torch.float8_e4m3fn)}
    elif fmt == "mxfp8":
        p = {"scale": t["weight_scale"].view(torch.float8_e8m0fnu)}
    elif fmt == "asym_w4a8_int8":
        s_rel = t["weight_s_rel"]
        p = {"scale": s_rel.view(torch.float8_e4m3fn) if s_rel.dtype == torch.uint8 else s_rel,
             "s_channel": t["weight_s_channel"], "codebook": t.get("weight_codebook"),
             "correction": t.get("weight_correction"), "group_size": int(flag("group_size", 16)),
             "convrot_groupsize": int(flag("convrot_groupsize", 256))}  # fmt: skip
    elif fmt == "awq_w4a16":
        p = {"scale": t["weight_scale"], "zeros": t["weight_zeros"], "group_size": int(conf.get("group_size", 64))}
    else:
        p = {"scale": t["weight_scale"], "convrot_groupsize": int(flag("convrot_groupsize", 256)),
             "quant_group_size": 64, "linear_dtype": flag("linear_dtype", "int4")}  # fmt: skip
    params = get_layout_class(layout).Params(**p, orig_dtype=torch.float32, orig_shape=tuple(shape))
    out = QuantizedTensor(w, layout, params).dequantize().float()
    if "pre_quant_scale" in t:  # ComfyUI multiplies the input by it; the same as scaling W's columns
        out = out * t["pre_quant_scale"].float()
    return out


def kitchen_weights(path, shapes=None) -> dict[str, torch.Tensor]:
    """Every weight of a file in float32, quantised layers through `kitchen_weight` (`shapes`: the model's;
    by default the stored weights' own, right for the unpacked int8 / fp8 formats)."""
    sd = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        header = json.loads((f.metadata() or {}).get("_quantization_metadata", '{"layers": {}}'))["layers"]
    confs = {k.removesuffix(".comfy_quant"): json.loads(bytes(v.tolist())) for k, v in sd.items() if "comfy_quant" in k}
    confs.update(header)
    out = {}
    for layer, conf in confs.items():
        mine = [k for k in sd if k.startswith(layer + ".") and k != layer + ".bias"]
        t = {k[len(layer) + 1 :]: sd.pop(k) for k in mine}
        t.pop("comfy_quant", None)
        shape = shapes[layer + ".weight"] if shapes is not None else tuple(t["weight"].shape)
        out[layer + ".weight"] = kitchen_weight(conf, t, shape)
    out.update({k: v.float() for k, v in sd.items() if k != "__index_timestep_zero__"})
    return out
