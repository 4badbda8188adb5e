"""LoRA file formats for the DiT, as data: key prefixes, key endings (which kind of patch, which tensor of it),
and how the pieces of one layer are put together. The math of each kind lives in `lora_kinds.py`.

A key is <prefix><layer><ending>, e.g. `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`. The spellings
are those diffusers (`_convert_non_diffusers_qwen_lora_to_diffusers`, PEFT) or ComfyUI (`comfy/lora.py`
`model_lora_keys_unet` for QwenImage and `load_lora`, `comfy/weight_adapter/*.py`) read for Qwen-Image:

* prefixes: none (DiffSynth, plain ComfyUI), `transformer.` (diffusers/PEFT, SimpleTuner), `diffusion_model.`
  (ai-toolkit, lightx2v, musubi-tuner "other" format), `lora_unet_` (kohya / musubi-tuner, dots written as `_`),
  `lycoris_` (SimpleTuner LyCORIS, dots as `_`), and the older `base_model.model.` / `model.diffusion_model.`;
* low-rank pairs (LoRA, with optional `.alpha` and DoRA `.dora_scale`): every up/down spelling in `ENDINGS`;
* LyCORIS LoKr (`lokr_w1`, `lokr_w2`, or their `_a`/`_b` factors) and LoHa (`hada_w1_a` ... `hada_w2_b`);
* full deltas: `.diff` (weight), `.diff_b` (bias), and LyCORIS norm deltas `.w_norm` / `.b_norm`.
A plain LoRA becomes a `LoraFactor` (applied beside the layer), everything else a `LoraTerm`.
Strict by default: any key that cannot be applied is an error listing it and what was tried; `lenient`
skips such keys (reported in `ParsedLora.skipped`) as long as something applies. Damaged tensors are always errors.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..checkpoint import Checkpoint, CheckpointError
from ..ops import FP8_DTYPES
from .dit import guess_family

# prefix -> whether the layer name after it has its dots written as underscores; longest first
PREFIXES = {
    "model.diffusion_model.": False,
    "base_model.model.": False,
    "diffusion_model.": False,
    "transformer.": False,
    "lora_unet_": True,
    "lycoris_": True,
}
# key ending -> (kind, role). Kinds: "lora" (up/down pair), "lokr", "loha", "diff" (role = the tensor it changes),
# "any" (read with whichever kind the layer has). Longest endings are tried first.
ENDINGS = {
    ".lora_up.weight": ("lora", "up"),  # kohya, musubi-tuner, lightx2v
    ".lora_down.weight": ("lora", "down"),
    ".lora_B.weight": ("lora", "up"),  # diffusers / PEFT, ai-toolkit
    ".lora_A.weight": ("lora", "down"),
    ".lora_B.default.weight": ("lora", "up"),  # PEFT with its adapter name (DiffSynth-Studio)
    ".lora_A.default.weight": ("lora", "down"),
    ".lora.up.weight": ("lora", "up"),  # ComfyUI "diffusers3"
    ".lora.down.weight": ("lora", "down"),
    "_lora.up.weight": ("lora", "up"),  # diffusers attention-processor LoRA (`to_q_lora.up.weight`)
    "_lora.down.weight": ("lora", "down"),
    ".lora_linear_layer.up.weight": ("lora", "up"),  # transformers-style LoRA layers
    ".lora_linear_layer.down.weight": ("lora", "down"),
    ".lora_B": ("lora", "up"),  # without `.weight` (ComfyUI's "mochi" spelling)
    ".lora_A": ("lora", "down"),
    ".lokr_w1": ("lokr", "w1"),
    ".lokr_w2": ("lokr", "w2"),
    ".lokr_w1_a": ("lokr", "w1_a"),
    ".lokr_w1_b": ("lokr", "w1_b"),
    ".lokr_w2_a": ("lokr", "w2_a"),
    ".lokr_w2_b": ("lokr", "w2_b"),
    ".hada_w1_a": ("loha", "w1_a"),
    ".hada_w1_b": ("loha", "w1_b"),
    ".hada_w2_a": ("loha", "w2_a"),
    ".hada_w2_b": ("loha", "w2_b"),
    ".diff": ("diff", "weight"),
    ".diff_b": ("diff", "bias"),
    ".w_norm": ("diff", "weight"),
    ".b_norm": ("diff", "bias"),
    ".alpha": ("any", "alpha"),
    ".dora_scale": ("any", "dora_scale"),
}
# endings of patch kinds that are recognised but not applied, and why
UNSUPPORTED = {
    ".lora_mid.weight": "a LoCon/Tucker middle factor (convolution layers only; Qwen-Image's layers are linear)",
    ".lokr_t2": "a LoKr Tucker core (convolution layers only)",
    ".hada_t1": "a LoHa Tucker core (convolution layers only)",
    ".hada_t2": "a LoHa Tucker core (convolution layers only)",
    ".reshape_weight": "a request to resize the layer's weight (a model of another size)",
    ".set_weight": "a replacement weight ('set' patch)",
    ".oft_blocks": "OFT (orthogonal fine-tuning)",
    ".oft_diag": "OFT (orthogonal fine-tuning)",
    ".a1.weight": "GLoRA",
    ".a2.weight": "GLoRA",
    ".b1.weight": "GLoRA",
    ".b2.weight": "GLoRA",
}
# what one layer needs of each kind: alternatives of role sets (any one complete set)
COMPLETE = {
    "lora": ({"up", "down"},),
    "lokr": ({"w1", "w2"}, {"w1", "w2_a", "w2_b"}, {"w1_a", "w1_b", "w2"}, {"w1_a", "w1_b", "w2_a", "w2_b"}),
    "loha": ({"w1_a", "w1_b", "w2_a", "w2_b"},),
    "diff": ({"weight"},),
}
PEFT_METADATA_KEY = "lora_adapter_metadata"
_ROLE_ORDER = ("alpha", "down", "up", "w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "weight", "bias", "dora_scale")
_ENDINGS_LONGEST_FIRST = sorted({**ENDINGS, **UNSUPPORTED}, key=len, reverse=True)


@dataclass(frozen=True)
class LoraFactor:
    """A plain LoRA of one linear layer: W += strength * scale * (up @ down)."""

    module: str  # the model's module name, e.g. transformer_blocks.0.attn.to_q
    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r]
    scale: float  # alpha / r (or 1); the user's strength multiplies this
    alpha: float | None = None  # the file's alpha (ComfyUI's patches take it as is)
    keys: tuple[str, ...] = ()  # the file's keys it was read from


@dataclass(frozen=True, eq=False)
class LoraTerm:
    """Any other patch of one tensor of a layer: a LoRA with DoRA, LoKr, LoHa, or a full delta (`lora_kinds.py`)."""

    module: str
    kind: str  # "lora" (with dora_scale), "lokr", "loha" or "diff"
    target: str  # "weight" or "bias": the tensor it changes
    tensors: dict[str, torch.Tensor]  # by role (see COMPLETE)
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    keys: tuple[str, ...] = ()  # the file's keys it was read from


@dataclass
class ParsedLora:
    factors: list[LoraFactor] = field(default_factory=list)
    terms: list[LoraTerm] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, why) not applied (lenient only)


def split_key(key: str) -> tuple[str, str, str, str] | None:
    """(prefix, layer name as written, kind, role) of a key, or None if its ending is no LoRA tensor's."""
    ending = next((e for e in _ENDINGS_LONGEST_FIRST if key.endswith(e)), None)
    if ending is None:
        return None
    name = key[: -len(ending)]
    prefix = next((p for p in PREFIXES if name.startswith(p)), "")
    kind, role = ENDINGS.get(ending, ("unsupported", ending))
    return prefix, name[len(prefix) :], kind, role


def parse_lora(ckpt: Checkpoint, module_names: Iterable[str], lenient: bool = False) -> ParsedLora:
    """Match every key of a LoRA file to a layer of the model and assemble each layer's patches."""
    modules = set(module_names)
    by_underscore = {m.replace(".", "_"): m for m in modules}
    groups: dict[str, dict[tuple[str, str], str]] = {}  # module -> (kind, role) -> key
    unusable: dict[str, list[tuple[str, str]]] = {}  # what is wrong -> [(key, detail)]
    for key in ckpt:
        parts = split_key(key)
        if parts is None:
            unusable.setdefault("unknown", []).append((key, ""))
            continue
        prefix, name, kind, role = parts
        if kind == "unsupported":
            unusable.setdefault("unsupported", []).append((key, UNSUPPORTED[role]))
            continue
        module = by_underscore.get(name) if PREFIXES.get(prefix) else (name if name in modules else None)
        if module is None:
            unusable.setdefault("unmatched", []).append((key, _tried(prefix, name, modules)))
            continue
        slot = groups.setdefault(module, {})
        if (kind, role) in slot:
            twice = f"{module} has its {role} twice (also {slot[kind, role]})"
            unusable.setdefault("incomplete", []).append((key, twice))
        else:
            slot[kind, role] = key
    if not groups and not unusable:
        raise CheckpointError(f"{ckpt.path}: holds no tensors")

    scales = _peft_scales(ckpt.path, ckpt.metadata)
    out = ParsedLora()
    for module, slot in sorted(groups.items()):
        problem = _incomplete(module, slot)
        if problem:
            unusable.setdefault("incomplete", []).extend((k, problem) for k in slot.values())
            continue
        _assemble(ckpt, module, slot, scales, out)
    if unusable:
        usable = bool(out.factors or out.terms)
        if not (lenient and usable):
            raise CheckpointError(_refusal(ckpt, unusable, usable, modules))
        out.skipped = [(k, _WHAT[w][0] + (f": {d}" if d else "")) for w, items in unusable.items() for k, d in items]
    return out


def _tried(prefix: str, name: str, modules: set[str]) -> str:
    """What a key that names no layer was taken to mean, and the nearest layer names."""
    dotted = PREFIXES.get(prefix, False)
    how = f" after {prefix!r}" + (" (dots written as '_')" if dotted else "") if prefix else ""
    names = {m.replace(".", "_"): m for m in modules} if dotted else {m: m for m in modules}
    near = [names[n] for n in difflib.get_close_matches(name, names, n=2, cutoff=0.8)]
    return f"no layer {name!r}{how}" + (f"; nearest: {', '.join(near)}" if near else "")


def _incomplete(module: str, slot: dict[tuple[str, str], str]) -> str | None:
    """Why a layer's keys do not make a patch (missing or conflicting pieces), or None. A layer has at most one
    patch of its weight (of one kind) and one delta of its bias."""
    weight = {(k, r) for k, r in slot if k != "any" and (k, r) != ("diff", "bias")}
    kinds = sorted({k for k, _ in weight})
    if len(kinds) > 1:
        return f"{module} has patches of two kinds ({', '.join(kinds)}): which one applies is ambiguous"
    if not kinds and ("diff", "bias") not in slot:
        return f"{' and '.join(r for _, r in slot)} for {module} without any factors"
    if kinds:
        roles = {r for _, r in weight}
        if not any(roles == need for need in COMPLETE[kinds[0]]):
            sets = " or ".join("+".join(sorted(s)) for s in COMPLETE[kinds[0]])
            return f"{module}'s {kinds[0]} patch has {'+'.join(sorted(roles))}, needs {sets}"
    if ("any", "dora_scale") in slot and kinds in ([], ["diff"]):
        return f"{module} has a dora_scale but no low-rank factors to decompose"
    if slot.get(("diff", "bias"), "").endswith(".b_norm") and not slot.get(("diff", "weight"), "").endswith(".w_norm"):
        return f"{module} has a b_norm without its w_norm (ComfyUI applies b_norm only with w_norm)"
    return None


def _assemble(ckpt: Checkpoint, module: str, slot, scales, out: ParsedLora) -> None:
    """The patches of one complete layer, their tensors checked (damage is an error in any mode)."""
    path = ckpt.path
    tensors, keys, alpha, dora, kind = {}, {}, None, None, "diff"
    for (k, role), key in sorted(slot.items(), key=lambda item: _ROLE_ORDER.index(item[0][1])):
        t = ckpt[key]
        if role == "alpha":
            alpha = _alpha(path, key, t)
            continue
        _check_tensor(path, key, t, k, role)
        if role == "dora_scale":
            dora = t
        elif (k, role) == ("diff", "bias"):
            out.terms.append(LoraTerm(module, "diff", "bias", {"diff": t}, keys=(key,)))
        else:
            tensors[role], keys[role], kind = t, key, k
    if not tensors:
        return
    if kind == "diff":  # an alpha beside a full delta means nothing (ComfyUI ignores it too)
        out.terms.append(LoraTerm(module, "diff", "weight", {"diff": tensors["weight"]}, keys=(keys["weight"],)))
        return
    _check_inner_ranks(path, kind, tensors, keys)
    used = tuple(key for (k, r), key in slot.items() if (k, r) != ("diff", "bias"))
    if kind == "lora":
        down, up, rank = tensors["down"], tensors["up"], tensors["down"].shape[0]
        scale = 1.0 if alpha is None else alpha / rank
        if alpha is None and scales[1] is not None:  # PEFT metadata: lora_alpha / r (ComfyUI gets it as an alpha)
            scale = _metadata_scale(path, module, scales, rank)
            alpha = scale * rank
        if dora is None:
            out.factors.append(LoraFactor(module, down, up, scale, alpha, used))
            return
    out.terms.append(LoraTerm(module, kind, "weight", tensors, alpha, dora, used))


def _check_inner_ranks(path, kind: str, t: dict[str, torch.Tensor], keys: dict[str, str]) -> None:
    """The factors of a product agree on their inner size (the rank)."""
    pairs = {"lora": [("down", "up")], "lokr": [("w1_b", "w1_a"), ("w2_b", "w2_a")],
             "loha": [("w1_b", "w1_a"), ("w2_b", "w2_a")]}[kind]  # fmt: skip
    for a, b in pairs:
        if a in t and b in t and t[a].shape[0] != t[b].shape[1]:
            raise CheckpointError(
                f"{path}: LoRA factors disagree on the rank ({keys[a]} is {list(t[a].shape)}, {keys[b]} is "
                f"{list(t[b].shape)})"
            )
    if kind == "loha" and (t["w1_a"].shape[0], t["w1_b"].shape[1]) != (t["w2_a"].shape[0], t["w2_b"].shape[1]):
        raise CheckpointError(f"{path}: the two LoHa halves of {keys['w1_a']} make weights of different shapes")


_WHAT = {  # a group of unusable keys: (one key ..., several keys ...)
    "unmatched": ("names no layer of the model", "name no layer of the model"),
    "unknown": ("is not a LoRA tensor of a kind QwenPix reads", "are not LoRA tensors of a kind QwenPix reads"),
    "unsupported": ("is of a kind QwenPix does not apply", "are of a kind QwenPix does not apply"),
    "incomplete": ("does not make a whole patch", "do not make a whole patch"),
}


def _refusal(ckpt: Checkpoint, unusable: dict, usable: bool, modules: set[str]) -> str:
    """The error for a file with keys that cannot be applied: each group of keys, what was tried, what was expected."""
    n = sum(len(v) for v in unusable.values())
    if usable:
        head = (f"{ckpt.path}: {n} of {len(ckpt)} keys of this LoRA cannot be applied to this Qwen-Image DiT "
                "(the others can: read it leniently to skip these)")  # fmt: skip
    else:
        looks = guess_family(list(ckpt.keys())) if set(unusable) == {"unknown"} else None
        head = f"{ckpt.path}: is not a LoRA for this Qwen-Image DiT" + (f"; it looks like {looks}" if looks else "")
    lines = [head]
    for what in _WHAT:
        items = unusable.get(what, [])
        if items:
            lines.append(f"  {len(items)} key{'s' if len(items) > 1 else ''} {_WHAT[what][len(items) > 1]}:")
            lines += [f"    {k}" + (f": {d}" if d else "") for k, d in items[:4]]
            lines += [f"    ... and {len(items) - 4} more"] if len(items) > 4 else []
    if "unmatched" in unusable or "unknown" in unusable:
        sample = sorted(modules, key=lambda m: (m.count("."), m))[:3]
        prefixes = ", ".join(repr(p) + (" (dots as '_')" if u else "") for p, u in PREFIXES.items())
        lines.append(
            f"  expected <prefix><layer><ending>: prefixes '', {prefixes}; layers such as {', '.join(sample)} "
            f"({len(modules)} layers); endings such as .lora_A.weight/.lora_B.weight, .lora_down.weight/"
            ".lora_up.weight, .alpha, .dora_scale, .lokr_w1, .hada_w1_a, .diff, .diff_b"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Tensor checks and scales
# ---------------------------------------------------------------------------------------------------------


def _check_tensor(path, key: str, t: torch.Tensor, kind: str, role: str) -> None:
    """Factors and deltas are float tensors of finite numbers; factors are non-empty matrices (linear layers)."""
    if not t.is_floating_point():
        raise CheckpointError(f"{path}: LoRA factor {key} is {str(t.dtype).removeprefix('torch.')}, not floating point")
    if kind != "diff" and role != "dora_scale":
        if t.ndim != 2:
            raise CheckpointError(
                f"{path}: LoRA factor {key} is {list(t.shape)}, not a matrix: only LoRAs of linear layers are supported"
            )
        if t.numel() == 0:
            rank_dim = {"down": 0, "up": 1, "w1_a": 1, "w2_a": 1, "w1_b": 0, "w2_b": 0}.get(role)
            what = "rank 0" if rank_dim is not None and t.shape[rank_dim] == 0 else "no features"
            raise CheckpointError(f"{path}: LoRA factor {key} is {list(t.shape)} ({what}): it holds no values")
    _check_finite(path, key, t)


def _check_finite(path, key: str, t: torch.Tensor) -> None:
    x = t if t.dtype not in FP8_DTYPES else t.float()
    if not bool(torch.isfinite(x).all()):
        nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        what = ", ".join(s for s in (nan and f"{nan} NaN", inf and f"{inf} infinite") if s)
        raise CheckpointError(
            f"{path}: LoRA tensor {key} holds non-finite values ({what} of {x.numel()}): the file is damaged "
            "(or was saved from a diverged training run)"
        )


def _alpha(path, key: str, t: torch.Tensor) -> float:
    """An `.alpha`: one finite number (a scalar or [1])."""
    if t.numel() != 1:
        raise CheckpointError(f"{path}: LoRA alpha {key} is {list(t.shape)}; an alpha is one number (shape [] or [1])")
    if t.dtype == torch.bool or t.is_complex():
        raise CheckpointError(f"{path}: LoRA alpha {key} is {str(t.dtype).removeprefix('torch.')}, not a number")
    if t.is_floating_point():
        _check_finite(path, key, t)
    return float(t.float().item())


def _peft_scales(path, metadata: dict[str, str]) -> tuple:
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
    return cfg.get("r"), cfg.get("lora_alpha"), cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}, \
        bool(cfg.get("use_rslora"))  # fmt: skip


def _pattern_value(patterns: dict, module: str, default):
    """PEFT rank/alpha patterns: the first key that is the module name's suffix or a regex matching it."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


def _metadata_scale(path, module: str, scales: tuple, rank: int) -> float:
    """lora_alpha / r (or / sqrt(r) with rsLoRA) from PEFT metadata, with both checked to be usable numbers."""
    r_meta, alpha_meta, rank_pattern, alpha_pattern, rslora = scales
    alpha = _pattern_value(alpha_pattern, module, alpha_meta)
    r = _pattern_value(rank_pattern, module, r_meta or rank)
    for name, v in (("lora_alpha", alpha), ("r", r)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise CheckpointError(f"{path}: {PEFT_METADATA_KEY} gives {name} = {v!r} for {module}: not a finite number")
    if r <= 0:
        raise CheckpointError(f"{path}: {PEFT_METADATA_KEY} gives rank r = {r!r} for {module}: it must be at least 1")
    return alpha / (r**0.5 if rslora else r)
