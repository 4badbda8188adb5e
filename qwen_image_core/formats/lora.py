"""LoRA file formats for the DiT, as data: key prefixes, factor suffixes, and how the scale is found.

Supported (facts sheet §5.3): diffusers/PEFT `transformer.<module>.lora_A/lora_B.weight` (optionally with
the adapter name `default.`; scale lora_alpha / r from the file's `lora_adapter_metadata`, else 1),
kohya `lora_unet_<module with _>.lora_down/lora_up.weight` + `.alpha`, and the "native" lightx2v
Lightning files `diffusion_model.<module>.lora_down/lora_up.weight` + `.alpha` (also without a prefix).
The result is one list of (module, down [r, in], up [out, r], scale) for `lora.py`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint, CheckpointError
from .dit import guess_family

# prefixes in front of the module name, longest first
PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_")
UNDERSCORED_PREFIXES = ("lora_unet_",)  # module names whose dots were replaced by underscores (kohya)
# key suffix -> which factor of the pair it holds
SUFFIXES = {
    ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".alpha": "alpha",
}
PEFT_METADATA_KEY = "lora_adapter_metadata"


@dataclass(frozen=True)
class LoraFactor:
    module: str  # the model's module name, e.g. transformer_blocks.0.attn.to_q
    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r]
    scale: float  # alpha / r (or 1); the user's strength multiplies this


def _split(key: str) -> tuple[str, str, str] | None:
    """(prefix, module, role) of a key, or None if it is not a LoRA factor key."""
    for suffix, role in SUFFIXES.items():
        if key.endswith(suffix):
            name = key[: -len(suffix)]
            prefix = next((p for p in PREFIXES if name.startswith(p)), "")
            return prefix, name[len(prefix) :], role
    return None


def _peft_scales(path, metadata: dict[str, str]) -> tuple[float | None, float | None, dict, dict, bool]:
    """(r, lora_alpha, rank_pattern, alpha_pattern, use_rslora) from diffusers' saved PEFT config, if any."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return None, None, {}, {}, False
    try:
        loaded = json.loads(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the {PEFT_METADATA_KEY} metadata is not valid JSON ({e})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: the {PEFT_METADATA_KEY} metadata is not a JSON object")
    cfg = {k.removeprefix("transformer."): v for k, v in loaded.items()}
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise CheckpointError(f"{path}: {PEFT_METADATA_KEY} {key} is not an object")
    return (
        cfg.get("r"),
        cfg.get("lora_alpha"),
        cfg.get("rank_pattern") or {},
        cfg.get("alpha_pattern") or {},
        bool(cfg.get("use_rslora")),
    )


def _pattern_value(patterns: dict, module: str, default):
    """PEFT rank/alpha patterns: the first key that is the module name's suffix or a regex matching it."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


def parse_lora(ckpt: Checkpoint, module_names: Iterable[str]) -> list[LoraFactor]:
    """Match every LoRA pair in the file to a module of the model; any key that matches nothing is an error."""
    modules = set(module_names)
    by_underscore = {m.replace(".", "_"): m for m in modules}
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # module -> role -> (key, tensor)
    unknown, unmatched = [], []
    for key in ckpt:
        parts = _split(key)
        if parts is None:
            unknown.append(key)
            continue
        prefix, name, role = parts
        module = by_underscore.get(name) if prefix in UNDERSCORED_PREFIXES else name
        if module not in modules:
            unmatched.append(key)
            continue
        pairs.setdefault(module, {})[role] = (key, ckpt[key])
    if not pairs and not unknown and not unmatched:
        raise CheckpointError(f"{ckpt.path}: holds no tensors")
    if unknown or unmatched or not pairs:
        looks = guess_family(list(ckpt.keys())) if not pairs else None
        lines = [f"{ckpt.path}: is not a LoRA for this Qwen-Image DiT" + (f"; it looks like {looks}" if looks else "")]
        if unmatched:
            lines.append(f"  {len(unmatched)} LoRA keys name no layer of the model, e.g. {', '.join(unmatched[:4])}")
        if unknown:
            lines.append(
                f"  {len(unknown)} keys are not LoRA factors (lora_A/B, lora_down/up, alpha), e.g. "
                f"{', '.join(unknown[:4])}"
            )
        raise CheckpointError("\n".join(lines))

    r_meta, alpha_meta, rank_pattern, alpha_pattern, rslora = _peft_scales(ckpt.path, ckpt.metadata)
    out = []
    for module, f in sorted(pairs.items()):
        if "down" not in f or "up" not in f:
            raise CheckpointError(f"{ckpt.path}: LoRA for {module} lacks its {'up' if 'down' in f else 'down'} factor")
        (down_key, down), (up_key, up) = f["down"], f["up"]
        _check_factor(ckpt.path, down_key, down, 0)
        _check_factor(ckpt.path, up_key, up, 1)
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise CheckpointError(
                f"{ckpt.path}: LoRA factors of {module} disagree on the rank ({down_key} is {list(down.shape)}, "
                f"{up_key} is {list(up.shape)})"
            )
        if "alpha" in f:
            scale = _alpha(ckpt.path, *f["alpha"]) / rank
        elif alpha_meta is not None:
            alpha = _pattern_value(alpha_pattern, module, alpha_meta)
            r = _pattern_value(rank_pattern, module, r_meta or rank)
            scale = _metadata_scale(ckpt.path, module, alpha, r, rslora)
        else:
            scale = 1.0
        out.append(LoraFactor(module, down, up, scale))
    return out


def _check_factor(path, key: str, t: torch.Tensor, rank_dim: int) -> None:
    """A factor is a float matrix (down [rank, in], up [out, rank]) with rank >= 1, of finite numbers."""
    if t.ndim != 2:
        raise CheckpointError(
            f"{path}: LoRA factor {key} is {list(t.shape)}, not a matrix: only LoRAs of linear layers are supported"
        )
    if t.numel() == 0:
        kind = "rank 0" if t.shape[rank_dim] == 0 else "no features"
        raise CheckpointError(f"{path}: LoRA factor {key} is {list(t.shape)} ({kind}): it holds no values")
    if not t.is_floating_point():
        raise CheckpointError(f"{path}: LoRA factor {key} is {str(t.dtype).removeprefix('torch.')}, not floating point")
    _check_finite(path, key, t)


def _check_finite(path, key: str, t: torch.Tensor) -> None:
    x = t if t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) else t.float()
    if not bool(torch.isfinite(x).all()):
        nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        what = ", ".join(s for s in (nan and f"{nan} NaN", inf and f"{inf} infinite") if s)
        raise CheckpointError(
            f"{path}: LoRA tensor {key} holds non-finite values ({what} of {x.numel()}): the file is damaged "
            "(or was saved from a diverged training run)"
        )


def _alpha(path, key: str, t: torch.Tensor) -> float:
    """A kohya/lightx2v `.alpha`: one finite number (a scalar or [1])."""
    if t.numel() != 1:
        raise CheckpointError(f"{path}: LoRA alpha {key} is {list(t.shape)}; an alpha is one number (shape [] or [1])")
    if t.dtype == torch.bool or t.is_complex():
        raise CheckpointError(f"{path}: LoRA alpha {key} is {str(t.dtype).removeprefix('torch.')}, not a number")
    if t.is_floating_point():
        _check_finite(path, key, t)
    return float(t.float().item())


def _metadata_scale(path, module: str, alpha, r, rslora: bool) -> float:
    """lora_alpha / r (or / sqrt(r) with rsLoRA) from PEFT metadata, with both checked to be usable numbers."""
    for name, v in (("lora_alpha", alpha), ("r", r)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise CheckpointError(f"{path}: {PEFT_METADATA_KEY} gives {name} = {v!r} for {module}: not a finite number")
    if r <= 0:
        raise CheckpointError(f"{path}: {PEFT_METADATA_KEY} gives rank r = {r!r} for {module}: it must be at least 1")
    return alpha / (r**0.5 if rslora else r)
