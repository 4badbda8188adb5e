"""Writers of random DiT LoRA files in the real layouts: low-rank pairs in every key spelling Qwen-Image LoRAs
use (diffusers/PEFT, kohya / musubi-tuner, lightx2v, ai-toolkit, DiffSynth, SimpleTuner LyCORIS, ComfyUI's other
spellings), LyCORIS LoKr and LoHa, DoRA scales, and full diff / diff_b deltas."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qwen_image_core.mmdit import MMDiTConfig
from tools.checkpoints.dit import shapes as dit_shapes

# the layers LoRA trainers usually target, per block, plus two top-level ones
BLOCK_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "txt_mlp.net.2",
    "img_mod.1",
)
TOP_TARGETS = ("img_in", "proj_out")
FORMATS = ("peft", "kohya", "lightx2v")
# spelling -> (prefix, dots written as '_', down ending, up ending); who writes it
SPELLINGS = {
    "peft": ("transformer.", False, ".lora_A.weight", ".lora_B.weight"),  # diffusers / PEFT
    "kohya": ("lora_unet_", True, ".lora_down.weight", ".lora_up.weight"),  # kohya sd-scripts, musubi-tuner
    "lightx2v": ("diffusion_model.", False, ".lora_down.weight", ".lora_up.weight"),  # Qwen-Image-Lightning
    "ai_toolkit": ("diffusion_model.", False, ".lora_A.weight", ".lora_B.weight"),  # also musubi "other"
    "diffsynth": ("", False, ".lora_A.default.weight", ".lora_B.default.weight"),  # DiffSynth-Studio (PEFT)
    "peft_default": ("transformer.", False, ".lora_A.default.weight", ".lora_B.default.weight"),
    "bare": ("", False, ".lora_down.weight", ".lora_up.weight"),  # ComfyUI's plain layer names
    "lycoris": ("lycoris_", True, ".lora_down.weight", ".lora_up.weight"),  # SimpleTuner LyCORIS
    "dot_lora": ("transformer.", False, ".lora.down.weight", ".lora.up.weight"),  # ComfyUI "diffusers3"
    "processor": ("", False, "_lora.down.weight", "_lora.up.weight"),  # diffusers attention-processor LoRA
    "linear_layer": ("transformer.", False, ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    "mochi": ("diffusion_model.", False, ".lora_A", ".lora_B"),  # no `.weight`
}
LOKR_FORMS = ("w1+w2ab", "w1ab+w2ab", "w1+w2", "w1ab+w2")  # which LoKr halves are stored whole / factored


def _shape(cfg: MMDiTConfig, target: str) -> tuple[int, int]:
    """(out, in) of a target layer."""
    h = cfg.hidden
    return {
        "img_in": (h, cfg.in_channels),
        "proj_out": (cfg.in_channels, h),
        "attn.to_q": (h, h),
        "attn.to_k": (h, h),
        "attn.add_v_proj": (h, h),
        "attn.to_out.0": (h, h),
        "attn.to_add_out": (h, h),
        "img_mlp.net.0.proj": (cfg.mlp_dim, h),
        "txt_mlp.net.2": (h, cfg.mlp_dim),
        "img_mod.1": (6 * h, h),
    }[target]


def lora_modules(cfg: MMDiTConfig) -> list[tuple[str, tuple[int, int]]]:
    mods = [(t, _shape(cfg, t)) for t in TOP_TARGETS]
    for i in range(cfg.num_layers):
        mods += [(f"transformer_blocks.{i}.{t}", _shape(cfg, t)) for t in BLOCK_TARGETS]
    return mods


def key_base(module: str, spelling: str) -> str:
    """The key of a layer in a spelling, without the ending: e.g. lora_unet_transformer_blocks_0_attn_to_q."""
    prefix, underscored = SPELLINGS[spelling][:2]
    return prefix + (module.replace(".", "_") if underscored else module)


def _save(path: Path, sd: dict, metadata: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=metadata)
    return path


def _alpha(alpha: float, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(alpha, dtype=torch.float32).reshape(shape)


def write_lora(
    path: Path,
    cfg: MMDiTConfig,
    fmt: str,
    rank: int = 4,
    alpha: float | None = 8.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    alpha_shape: tuple[int, ...] = (),
    modules: list[tuple[str, tuple[int, int]]] | None = None,
    dora: str | None = None,
) -> Path:
    """A random LoRA over `modules` (default `lora_modules(cfg)`) in spelling `fmt` (a key of SPELLINGS; `fmt`
    is a str or, for a file mixing spellings, a tuple of them used in turn). `alpha` goes to the PEFT metadata
    for "peft", to `.alpha` tensors of `alpha_shape` ([] or [1]) otherwise (None: no alpha). `dora` "out" / "in"
    adds DoRA `.dora_scale` magnitudes per output row ([out, 1]) or input column ([1, in])."""
    g = torch.Generator().manual_seed(seed)
    sd, metadata = {}, None
    spellings = (fmt,) if isinstance(fmt, str) else tuple(fmt)
    for i, (module, (out_f, in_f)) in enumerate(modules or lora_modules(cfg)):
        spelling = spellings[i % len(spellings)]
        if spelling not in SPELLINGS:
            raise ValueError(f"unknown LoRA spelling {spelling!r}; one of {list(SPELLINGS)}")
        base, (_, _, down_end, up_end) = key_base(module, spelling), SPELLINGS[spelling]
        sd[base + down_end] = (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(dtype)
        sd[base + up_end] = (torch.randn(out_f, rank, generator=g) * 0.1).to(dtype)
        if alpha is not None and fmt != "peft":
            sd[base + ".alpha"] = _alpha(alpha, alpha_shape)
        if dora is not None:
            sd[base + ".dora_scale"] = _dora_scale(g, out_f, in_f, dora).to(dtype)
    if fmt == "peft" and alpha is not None:
        cfg_json = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": sorted({m.split(".", 2)[-1] for m, _ in lora_modules(cfg)}),
        }
        metadata = {
            "format": "pt",
            "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in cfg_json.items()}),
        }
    return _save(path, sd, metadata)


def _dora_scale(g: torch.Generator, out_f: int, in_f: int, axis: str) -> torch.Tensor:
    """Magnitudes near the norms of the random base weights (~N(0, 1/in): rows ~1, columns ~sqrt(out/in))."""
    if axis == "out":
        return 1.0 + 0.05 * torch.randn(out_f, 1, generator=g)
    if axis == "in":
        return (out_f / in_f) ** 0.5 * (1.0 + 0.05 * torch.randn(1, in_f, generator=g))
    raise ValueError(f"dora axis {axis!r}: 'out' or 'in'")


def factorization(dim: int) -> tuple[int, int]:
    """dim = m * n with m <= n as close as possible (LyCORIS' LoKr split without a factor limit)."""
    m = max(d for d in range(1, int(dim**0.5) + 1) if dim % d == 0)
    return m, dim // m


def write_lycoris(
    path: Path,
    cfg: MMDiTConfig,
    kind: str,
    spelling: str = "lycoris",
    form: str = "w1+w2ab",
    rank: int = 4,
    alpha: float | None = 8.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    dora: str | None = None,
    modules: list[tuple[str, tuple[int, int]]] | None = None,
) -> Path:
    """A random LyCORIS LoKr (`kind` "lokr", halves stored as `form`) or LoHa ("loha") file, keys in `spelling`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for module, (out_f, in_f) in modules or lora_modules(cfg):
        base = key_base(module, spelling)
        if kind == "loha":
            for half in ("w1", "w2"):
                sd[f"{base}.hada_{half}_a"] = (torch.randn(out_f, rank, generator=g) * 0.3).to(dtype)
                sd[f"{base}.hada_{half}_b"] = (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(dtype)
        elif kind == "lokr":
            (o1, o2), (i1, i2) = factorization(out_f), factorization(in_f)
            w1_form, w2_form = form.split("+")
            for half, (o, i), stored in (("w1", (o1, i1), w1_form), ("w2", (o2, i2), w2_form)):
                if stored.endswith("ab"):
                    sd[f"{base}.lokr_{half}_a"] = (torch.randn(o, rank, generator=g) * 0.3).to(dtype)
                    sd[f"{base}.lokr_{half}_b"] = (torch.randn(rank, i, generator=g) / i**0.5).to(dtype)
                else:
                    sd[f"{base}.lokr_{half}"] = (torch.randn(o, i, generator=g) * 0.3 / i**0.5).to(dtype)
        else:
            raise ValueError(f"unknown LyCORIS kind {kind!r}: 'lokr' or 'loha'")
        if alpha is not None:
            sd[f"{base}.alpha"] = _alpha(alpha, ())
        if dora is not None:
            sd[f"{base}.dora_scale"] = _dora_scale(g, out_f, in_f, dora).to(dtype)
    return _save(path, sd)


def write_diff(
    path: Path,
    cfg: MMDiTConfig,
    spelling: str = "lightx2v",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    modules: tuple[str, ...] = ("img_in", "proj_out"),
    biases: tuple[str, ...] = ("img_in", "transformer_blocks.0.img_mod.1"),
    norms: tuple[str, ...] = ("transformer_blocks.0.attn.norm_q", "txt_norm"),
    norm_ending: str = ".diff",
) -> Path:
    """Full deltas: `.diff` of the `modules`' weights, `.diff_b` of the `biases`' biases, and `norm_ending`
    (".diff" or LyCORIS ".w_norm") of RMSNorm scales."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(linear_layers(cfg))
    sd = {}
    for module in modules:
        out_f, in_f = shapes[module]
        sd[key_base(module, spelling) + ".diff"] = (torch.randn(out_f, in_f, generator=g) * 0.02 / in_f**0.5).to(dtype)
    for module in biases:
        sd[key_base(module, spelling) + ".diff_b"] = (torch.randn(shapes[module][0], generator=g) * 0.02).to(dtype)
    for module in norms:
        dim = cfg.text_dim if module == "txt_norm" else cfg.head_dim
        sd[key_base(module, spelling) + norm_ending] = (torch.randn(dim, generator=g) * 0.05).to(dtype)
    return _save(path, sd)


def linear_layers(cfg: MMDiTConfig) -> list[tuple[str, tuple[int, int]]]:
    """(name, (out, in)) of every linear layer of a DiT of this configuration."""
    return [(k.removesuffix(".weight"), s) for k, s in dit_shapes(cfg).items() if k.endswith(".weight") and len(s) == 2]


def write_every_kind(path: Path, cfg: MMDiTConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """One file with a patch of every kind, each on its own layers, as ComfyUI and QwenPix read them key by key:
    full deltas (diff, diff_b, norm scales), LoHa, LoKr (three forms), DoRA on a LoRA and on a LoKr, and plain
    LoRAs in every spelling (`.alpha` alternating [] and [1])."""
    layers = [m for m in linear_layers(cfg) if m[0] not in ("img_in",)]
    if len(layers) < 6 + len(SPELLINGS):
        raise ValueError("the configuration has too few linear layers for every kind")
    tmp = Path(path).with_suffix(".parts")
    parts = [
        write_diff(tmp / "diff.safetensors", cfg, "bare", seed, dtype, ("img_in",), ("img_in", layers[0][0])),
        write_lycoris(tmp / "loha.safetensors", cfg, "loha", "kohya", seed=seed, dtype=dtype, modules=layers[0:1]),
        write_lycoris(tmp / "k1.safetensors", cfg, "lokr", "lycoris", "w1+w2ab", seed=seed, modules=layers[1:2]),
        write_lycoris(
            tmp / "k2.safetensors", cfg, "lokr", "kohya", "w1ab+w2ab", alpha=None, seed=seed, modules=layers[2:3]
        ),
        write_lycoris(
            tmp / "k3.safetensors", cfg, "lokr", "lycoris", "w1+w2", seed=seed, dora="in", modules=layers[3:4]
        ),
        write_lora(
            tmp / "dora.safetensors", cfg, "ai_toolkit", seed=seed, dtype=dtype, dora="out", modules=layers[4:5]
        ),
    ]
    spread = layers[5 : 5 + len(SPELLINGS)]
    for i, alpha_shape in enumerate(((), (1,))):
        parts.append(write_lora(tmp / f"plain{i}.safetensors", cfg, tuple(SPELLINGS)[i::2], seed=seed + i,
                                dtype=dtype, alpha_shape=alpha_shape, modules=spread[i::2]))  # fmt: skip
    sd = {k: v for p in parts for k, v in load_file(str(p)).items()}
    for p in parts:
        p.unlink()
    tmp.rmdir()
    return _save(path, sd)
