"""Tiny random Qwen-Image DiT checkpoints in the real layouts, for tests and benchmarks.

Layouts: ComfyUI single file (bf16/fp16/fp32, optional `model.diffusion_model.` prefix, optional Edit-2511
marker `__index_timestep_zero__`), plain float8 (e4m3fn / e5m2, no scales), ComfyUI scaled fp8 (`scaled_fp8`
marker + `<layer>.scale_weight`), ComfyUI mixed precision (`_quantization_metadata` + `<layer>.weight_scale`,
or per-layer `comfy_quant`), and diffusers sharded `transformer/` folders (index json + config.json),
optionally inside a repo folder with `model_index.json`.

Single files of sizes the shapes do not tell (the tiny 32-channel heads) carry their transformer config in the
safetensors metadata `config` (see `formats.dit.CONFIG_METADATA`), as a user's file of another size must.

Files are streamed tensor by tensor (random values are generated per tensor from a seed and the key name),
so even full-width files of several blocks are written without holding them in memory.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from qwen_image_core.mmdit import MMDiT, MMDiTConfig

SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.uint8: "U8",
}  # fmt: skip
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
PREFIX = "model.diffusion_model."

# A small configuration that exercises every code path (3 heads x 32 channels, MLP 4 x 96, rope axes (4, 14, 14)).
TINY = dict(num_layers=2, num_heads=3, head_dim=32, mlp_dim=384, text_dim=40, rope_axes=(4, 14, 14))
FULL_WIDTH_ONE_BLOCK = dict(num_layers=1)
LAYERED = dict(layer3d_rope=True, additional_t_cond=True)  # Qwen-Image-Layered: tiny_config(**LAYERED)
FLAGS_FROM_KEYS = ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")  # config.json flags the keys tell


def config(**kw) -> MMDiTConfig:
    """A full-width configuration (the 20B model's widths) with `kw` overrides, e.g. num_layers=1."""
    return MMDiTConfig(**kw)


def tiny_config(**kw) -> MMDiTConfig:
    """TINY with `kw` overrides."""
    return MMDiTConfig(**{**TINY, **kw})


def shapes(cfg: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names (diffusers naming, no prefix) and shapes of a DiT with this configuration."""
    return dict(_shapes(cfg))


@functools.lru_cache(maxsize=16)
def _shapes(cfg: MMDiTConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        return tuple((k, tuple(v.shape)) for k, v in MMDiT(cfg).state_dict().items())


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic float32 values for one parameter: ~1/sqrt(fan_in) weights, small biases, norms near 1."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=g)
    if name.endswith(".bias"):
        return t * 0.1
    if len(shape) == 1:  # RMSNorm weights
        return 1.0 + 0.1 * t
    return t / shape[1] ** 0.5


def state_dict(cfg: MMDiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """The float32 random state dict (diffusers naming) that the writers below store."""
    return {k: random_tensor(k, s, seed) for k, s in shapes(cfg).items()}


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    return name.endswith(".weight") and len(shape) == 2


# ---------------------------------------------------------------------------------------------------------
# Streaming safetensors writer
# ---------------------------------------------------------------------------------------------------------

Entry = tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]


def write_safetensors(path: Path, entries: Iterable[Entry], metadata: dict[str, str] | None = None) -> Path:
    """Write (name, shape, dtype, make) entries; each tensor is made, written and dropped in turn."""
    entries = list(entries)
    header, offset = {}, 0
    for name, shape, dtype, _ in entries:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, dtype, make in entries:
            t = make().to(dtype).contiguous()
            assert tuple(t.shape) == tuple(shape), name
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return path


def _plain(cfg, seed, dtype, prefix="", linear_dtype=None) -> list[Entry]:
    out = []
    for k, s in shapes(cfg).items():
        dt = linear_dtype if linear_dtype is not None and is_linear_weight(k, s) else dtype
        out.append((prefix + k, s, dt, lambda k=k, s=s: random_tensor(k, s, seed)))
    return out


def config_metadata(cfg: MMDiTConfig, metadata: dict[str, str] | None = None) -> dict[str, str] | None:
    """`metadata` plus, for sizes the shapes do not tell (heads other than the real 128 channels), the
    transformer config in the single file's `config` metadata, where the loader reads it."""
    if cfg.head_dim == 128 and cfg.rope_axes == (16, 56, 56) and cfg.out_channels == 16:
        return metadata  # (a layered file is told by its addition_t_embedding, as the real ones are)
    # the 2511 marker says zero_cond_t, the layered file's addition_t_embedding says its two options
    conf = {k: v for k, v in diffusers_config(cfg).items() if k not in FLAGS_FROM_KEYS}
    return {**(metadata or {}), "config": json.dumps({"transformer": conf})}


def _marker(zero_cond_t: bool, prefix: str) -> list[Entry]:
    return [(prefix + "__index_timestep_zero__", (0,), torch.bfloat16, lambda: torch.empty(0))] if zero_cond_t else []


# ---------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------


def write_comfy(path, cfg, seed=0, dtype=torch.bfloat16, prefix="", zero_cond_t=False) -> Path:
    """ComfyUI single file: diffusers key names, optional `model.diffusion_model.` prefix."""
    entries = _plain(cfg, seed, dtype, prefix) + _marker(zero_cond_t, prefix)
    return write_safetensors(Path(path), entries, config_metadata(cfg))


def write_fp8(path, cfg, seed=0, fp8=torch.float8_e4m3fn, prefix="") -> Path:
    """Plain float8 file (`*_fp8_e4m3fn.safetensors`): Linear weights cast to float8, the rest bf16."""
    entries = _plain(cfg, seed, torch.bfloat16, prefix, linear_dtype=fp8)
    return write_safetensors(Path(path), entries, config_metadata(cfg))


def _scale(name, shape, seed, fp8) -> torch.Tensor:
    return random_tensor(name, shape, seed).abs().amax() / FP8_MAX[fp8]


def write_scaled_fp8(path, cfg, seed=0, fp8=torch.float8_e4m3fn, prefix=PREFIX) -> Path:
    """ComfyUI scaled fp8: marker `scaled_fp8`, fp8 Linear weights with float32 `scale_weight` (and `scale_input`)."""
    entries = [(prefix + "scaled_fp8", (0,), fp8, lambda: torch.empty(0))]
    for k, s in shapes(cfg).items():
        if not is_linear_weight(k, s):
            entries.append((prefix + k, s, torch.bfloat16, lambda k=k, s=s: random_tensor(k, s, seed)))
            continue
        layer = prefix + k.removesuffix(".weight")
        entries += [
            (prefix + k, s, fp8, lambda k=k, s=s: random_tensor(k, s, seed) / _scale(k, s, seed, fp8)),
            (layer + ".scale_weight", (), torch.float32, lambda k=k, s=s: _scale(k, s, seed, fp8)),
            (layer + ".scale_input", (), torch.float32, lambda: torch.tensor(1.0)),
        ]
    return write_safetensors(Path(path), entries, config_metadata(cfg))


def write_mixed(path, cfg, seed=0, fp8=torch.float8_e4m3fn, comfy_quant=False, prefix="") -> Path:
    """ComfyUI mixed precision: block Linear weights in fp8 with `weight_scale`, everything else bf16.

    The quantised layers are listed in the `_quantization_metadata` header, or (comfy_quant=True) each
    carries a `<layer>.comfy_quant` uint8 tensor holding its JSON description.
    """
    fmt = str(fp8).removeprefix("torch.")
    entries, layers = [], {}
    for k, s in shapes(cfg).items():
        if not (is_linear_weight(k, s) and k.startswith("transformer_blocks.") and "_mod." not in k):
            entries.append((prefix + k, s, torch.bfloat16, lambda k=k, s=s: random_tensor(k, s, seed)))
            continue
        layer = k.removesuffix(".weight")
        layers[layer] = {"format": fmt}
        entries += [
            (prefix + k, s, fp8, lambda k=k, s=s: random_tensor(k, s, seed) / _scale(k, s, seed, fp8)),
            (prefix + layer + ".weight_scale", (), torch.float32, lambda k=k, s=s: _scale(k, s, seed, fp8)),
        ]
        if comfy_quant:
            spec = json.dumps({"format": fmt, "full_precision_matrix_mult": True}).encode()
            entries.append(
                (prefix + layer + ".comfy_quant", (len(spec),), torch.uint8, lambda b=spec: torch.tensor(list(b)))
            )
    meta = None if comfy_quant else {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    return write_safetensors(Path(path), entries, config_metadata(cfg, meta))


def write_diffusers(folder, cfg, seed=0, dtype=torch.bfloat16, shards=2, zero_cond_t=False, repo=False) -> Path:
    """A diffusers `transformer/` folder (config.json, shards, index json); `repo=True` wraps it in a repo folder.

    Returns the folder a user would pass (the repo folder or the transformer folder).
    """
    root = Path(folder)
    tdir = root / "transformer" if repo else root
    entries = _plain(cfg, seed, dtype)
    per = -(-len(entries) // shards)
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {}
    for i, name in enumerate(names):
        part = entries[i * per : (i + 1) * per]
        write_safetensors(tdir / name, part)
        weight_map.update({e[0]: name for e in part})
    index = {
        "metadata": {"total_size": sum(f.stat().st_size for f in tdir.glob("*.safetensors"))},
        "weight_map": weight_map,
    }
    (tdir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tdir / "config.json").write_text(json.dumps(diffusers_config(cfg, zero_cond_t), indent=2))
    if repo:
        (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPlusPipeline"}))
    return root


def diffusers_config(cfg: MMDiTConfig, zero_cond_t: bool = False) -> dict:
    """The transformer config.json diffusers writes for this configuration (kwargs of its model class)."""
    return {
        "_class_name": "QwenImageTransformer2DModel",
        "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.num_layers,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.text_dim,
        "guidance_embeds": False,
        "axes_dims_rope": list(cfg.rope_axes),
        "zero_cond_t": zero_cond_t,
        "use_additional_t_cond": cfg.additional_t_cond,
        "use_layer3d_rope": cfg.layer3d_rope,
    }


def dequantized(path) -> dict[str, torch.Tensor]:
    """The float32 weights a file means (float8 x scale), prefix stripped, markers dropped: the reference's input."""
    from safetensors.torch import load_file  # noqa: PLC0415

    sd = load_file(str(path))
    prefix = PREFIX if sum(k.startswith(PREFIX) for k in sd) * 2 >= len(sd) else ""
    sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        if k in ("scaled_fp8", "__index_timestep_zero__") or k.endswith((".scale_input", ".comfy_quant")):
            continue
        if k.endswith((".scale_weight", ".weight_scale")):
            continue
        layer = k.removesuffix(".weight")
        scale = sd.get(layer + ".scale_weight", sd.get(layer + ".weight_scale"))
        out[k] = v.float() * scale.float() if scale is not None and scale.numel() else v.float()
    return out


def meta_model(storage: str = "bf16", cfg: MMDiTConfig | None = None) -> MMDiT:
    """A weightless DiT on the meta device with the real 20B shapes, Linear weights in float8 for storage "fp8"
    and bf16 otherwise: for planners and benchmarks that only need sizes and dtypes."""
    from qwen_image_core.ops import Linear

    with torch.device("meta"):
        m = MMDiT(cfg or MMDiTConfig()).to(torch.bfloat16)
    if storage == "fp8":
        for mod in m.modules():
            if isinstance(mod, Linear):
                mod.weight.data = mod.weight.data.to(torch.float8_e4m3fn)
    return m
