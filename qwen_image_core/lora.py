"""LoRA on the DiT without touching its weights.

A LoRA file is read into plain low-rank factors (`LoraFactor`) and other patches (`LoraTerm`: DoRA, LoKr, LoHa,
full weight and bias deltas; their math is `lora_kinds.py`). Plain factors are computed beside the layer
(`ops.Linear`: y = x W^T + s (x A^T) B^T); the other patches are applied when a layer's weight or bias is cast
for compute (`weight_fns` / `bias_fns`), in float32, from the stored tensors. So LoRAs are exact on float8
bases (no re-quantisation, the cause of line artifacts with naively merged Lightning LoRAs), several stack, and
removing them restores the base bit for bit because the base tensors are never written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from . import lora_kinds
from .checkpoint import CheckpointError, open_checkpoint
from .formats.lora import LoraFactor, LoraTerm, parse_lora
from .ops import Linear

SLOTS = ("lora", "weight_fns", "bias_fns")


@dataclass(frozen=True)
class Target:
    """A layer a LoRA may patch: its weight's and bias's shapes, and whether it is linear (low-rank kinds)."""

    weight: tuple[int, ...]
    bias: tuple[int, ...] | None = None
    linear: bool = True


@dataclass(frozen=True)
class Lora:
    """The patches of one LoRA file, matched to a model's layers."""

    path: str
    factors: tuple[LoraFactor, ...]
    terms: tuple[LoraTerm, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()  # (key, why) left out of a file read leniently

    @property
    def modules(self) -> list[str]:
        return sorted({f.module for f in self.factors} | {t.module for t in self.terms})

    def __repr__(self) -> str:  # short (no tensors), and without the directory: reprs reach logs and API clients
        return f"Lora({os.path.basename(self.path)!r}, {len(self.modules)} layers)"


def _patchable(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose tensors take patches at the cast (ours: Linear, RMSNorm)."""
    return {name: m for name, m in model.named_modules() if any(hasattr(m, s) for s in SLOTS)}


def load_lora(path: str | os.PathLike, model: nn.Module, lenient: bool = False) -> Lora:
    """Read a LoRA file in any supported format and check it against the model's layers and shapes."""
    return read_lora(path, lora_targets(model), lenient)


def lora_targets(model: nn.Module) -> dict[str, Target]:
    """Every layer of a model (ours or a host's) a LoRA may patch: linear layers and norms with a learnt scale."""
    out = {}
    for name, m in model.named_modules():
        w, b = m._parameters.get("weight"), m._parameters.get("bias")
        linear = isinstance(m, nn.Linear)
        if w is not None and (linear or w.ndim == 1):  # a packed weight's logical shape: (out, in) of the layer
            shape = (m.out_features, m.in_features) if linear else tuple(w.shape)
            out[name] = Target(shape, None if b is None else tuple(b.shape), linear)
    return out


def read_lora(path: str | os.PathLike, shapes: Mapping[str, Target | tuple[int, int]], lenient: bool = False) -> Lora:
    """Read a LoRA file in any supported format and check it against the layers `shapes` names ({name: Target},
    or {name: (out, in)} of linear layers). Strict: a key that cannot be applied is an error; `lenient` applies
    the rest and lists what it left out in `Lora.skipped` (a file of which nothing applies is an error anyway)."""
    targets = {k: v if isinstance(v, Target) else Target(tuple(v), (v[0],), True) for k, v in shapes.items()}
    parsed = parse_lora(open_checkpoint(path), targets, lenient)
    factors, terms, skipped = [], [], list(parsed.skipped)
    misfits = []
    for p in [*parsed.factors, *parsed.terms]:
        problem = _misfit(p, targets[p.module])
        if problem is None:
            (factors if isinstance(p, LoraFactor) else terms).append(p)
        else:
            misfits.append((p, problem))
    if misfits and not (lenient and (factors or terms)):
        p, problem = misfits[0]
        more = f" (and {len(misfits) - 1} more layers)" if len(misfits) > 1 else ""
        raise CheckpointError(f"{path}: LoRA for {p.module} {problem}{more}: it was made for another model")
    for p, problem in misfits:
        skipped += [(k, f"{problem}: made for another model") for k in p.keys]
    return Lora(str(path), tuple(factors), tuple(terms), tuple(skipped))


def _misfit(p: LoraFactor | LoraTerm, target: Target) -> str | None:
    """Why a patch does not fit its layer, or None."""
    if isinstance(p, LoraFactor):
        shape, kind, tensor = (p.up.shape[0], p.down.shape[1]), "lora", "weight"
    else:
        shape, kind, tensor = lora_kinds.produced_shape(p), p.kind, p.target
    want = target.weight if tensor == "weight" else target.bias
    if want is None:
        return "changes a bias, the layer has none"
    if kind != "diff" and not target.linear:
        return f"is a {kind} patch of a {list(want)} tensor, which is not a linear layer's weight"
    if tuple(shape) != tuple(want):
        what = f"{shape[0]}x{shape[1]}" if len(shape) == 2 and len(want) == 2 else str(list(shape))
        layer = f"{want[0]}x{want[1]}" if len(want) == 2 else str(list(want))
        return f"is {what}{'' if tensor == 'weight' else ' (bias)'}, the layer is {layer}"
    if isinstance(p, LoraTerm) and p.dora_scale is not None:
        allowed = lora_kinds.dora_shapes(*want)
        if tuple(p.dora_scale.shape) not in allowed:
            ok = " or ".join(str(list(a)) for a in allowed)
            return f"has a dora_scale of shape {list(p.dora_scale.shape)}; for this layer it is {ok}"
    return None


def set_loras(model: nn.Module, loras: Sequence[tuple[Lora, float]]) -> None:
    """Make exactly these (LoRA, strength) pairs active on the model, replacing any active before.

    A layer whose weight patches are all plain LoRAs gets them as factors (`Linear.lora`, computed beside the
    layer); a layer with any other weight patch gets all of them, in order, as functions at the cast."""
    layers = _patchable(model)
    weight: dict[str, list] = {}
    bias: dict[str, list] = {}
    for lora, strength in loras:
        if strength == 0:
            continue
        for f in lora.factors:
            weight.setdefault(f.module, []).append((f, strength))
        for t in lora.terms:
            (bias if t.target == "bias" else weight).setdefault(t.module, []).append((t, strength))
    for name in set(weight) | set(bias):
        if name not in layers:
            raise ValueError(f"cannot apply a LoRA to {name}: not a patchable layer of this model")
    for name, layer in layers.items():
        entries = weight.get(name, [])
        plain = hasattr(layer, "lora") and all(isinstance(p, LoraFactor) for p, _ in entries)
        if hasattr(layer, "lora"):
            layer.lora = tuple((p.down, p.up, s * p.scale) for p, s in entries) if plain else ()
        if hasattr(layer, "weight_fns"):
            layer.weight_fns = () if plain else tuple(_fn(p, s) for p, s in entries)
        if hasattr(layer, "bias_fns"):
            layer.bias_fns = tuple(lora_kinds.term_fn(t, s) for t, s in bias.get(name, []))


def _fn(p: LoraFactor | LoraTerm, strength: float):
    return lora_kinds.factor_fn(p, strength) if isinstance(p, LoraFactor) else lora_kinds.term_fn(p, strength)


@contextmanager
def loras_applied(model: nn.Module, loras: Sequence[tuple[Lora, float]]) -> Iterator[nn.Module]:
    """Activate LoRAs for the duration of a block (one sampling run); the previous set comes back after,
    also when the block is interrupted or fails."""
    layers = _patchable(model)
    before = {name: {s: getattr(m, s) for s in SLOTS if hasattr(m, s)} for name, m in layers.items()}
    set_loras(model, loras)
    try:
        yield model
    finally:
        for name, layer in layers.items():
            for slot, value in before[name].items():
                setattr(layer, slot, value)


def effective_weight(layer: Linear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight a layer computes with (dequantised, LoRAs added), for inspection and tests."""
    return layer.compute_weight(dtype)
