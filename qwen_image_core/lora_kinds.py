"""The math of every LoRA kind, in float32, in one place.

Each patch of a file (`formats.lora.LoraTerm`) changes one tensor W of a layer (its weight or bias):

* LoRA:  dW = up @ down, scale = alpha / rank (1 without alpha)
* LoKr:  dW = kron(w1, w2), each of w1, w2 stored whole or as a product a @ b; scale = alpha / dim where dim is
  the rank of the factored one (w2's when both are factored), 1 when both are whole or there is no alpha
* LoHa:  dW = (w1_a @ w1_b) * (w2_a @ w2_b), scale = alpha / rank of w1 (1 without alpha)
* diff:  dW = the stored delta, scale = 1
W' = W + strength * scale * dW; with DoRA (`dora_scale`, a LoRA/LoKr/LoHa) W' is the decomposed weight below.
These are the rules of ComfyUI's weight adapters (`comfy/weight_adapter/lora.py`, `lokr.py`, `loha.py`,
`base.py weight_decompose`) and LyCORIS, written out for QwenPix's own weight cast; plain LoRAs without DoRA
are not computed here but beside the layer (`ops.Linear`).
"""

from __future__ import annotations

import torch

from .formats.lora import LoraFactor, LoraTerm
from .ops import TensorFn

EPS = torch.finfo(torch.float32).eps


def _f32(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32)


def scale(term: LoraTerm) -> float:
    """The factor the file's alpha makes of a term's delta."""
    t, alpha = term.tensors, term.alpha
    if term.kind == "diff" or alpha is None:
        return 1.0
    if term.kind == "lora":
        return alpha / t["down"].shape[0]
    if term.kind == "loha":
        return alpha / t["w1_b"].shape[0]
    dim = t["w2_b"].shape[0] if "w2_b" in t else t["w1_b"].shape[0] if "w1_b" in t else None  # LoKr
    return 1.0 if dim is None else alpha / dim


def _product(t: dict, name: str, device) -> torch.Tensor:
    """A stored matrix `name`, or the product of its factors `name_a @ name_b`."""
    if name in t:
        return _f32(t[name], device)
    return torch.mm(_f32(t[f"{name}_a"], device), _f32(t[f"{name}_b"], device))


def delta(term: LoraTerm, device=None) -> torch.Tensor:
    """A term's float32 delta before its scale and the strength, in the shape it produces."""
    t = term.tensors
    device = device if device is not None else next(iter(t.values())).device
    if term.kind == "lora":
        return torch.mm(_f32(t["up"], device), _f32(t["down"], device))
    if term.kind == "lokr":
        return torch.kron(_product(t, "w1", device), _product(t, "w2", device))
    if term.kind == "loha":
        return _product(t, "w1", device) * _product(t, "w2", device)
    return _f32(t["diff"], device)


def produced_shape(term: LoraTerm) -> tuple[int, ...]:
    """The shape of `delta(term)`, from the stored shapes (nothing is computed)."""
    t = term.tensors

    def whole(name):
        return tuple(t[name].shape) if name in t else (t[f"{name}_a"].shape[0], t[f"{name}_b"].shape[1])

    if term.kind == "lora":
        return t["up"].shape[0], t["down"].shape[1]
    if term.kind == "lokr":
        (a, b), (c, d) = whole("w1"), whole("w2")
        return a * c, b * d
    if term.kind == "loha":
        return whole("w1")
    return tuple(t["diff"].shape)


def dora_shapes(out_features: int, in_features: int) -> tuple[tuple[int, ...], ...]:
    """The `dora_scale` shapes ComfyUI decomposes correctly: a magnitude per output row or per input column."""
    return (out_features, 1), (1, in_features)


def decompose(w: torch.Tensor, scaled_delta: torch.Tensor, dora_scale: torch.Tensor, strength: float) -> torch.Tensor:
    """DoRA as ComfyUI computes it: (W + dW) rescaled to `dora_scale` per output row (norms of the weight W it
    is applied to) or per input column (norms of W + dW); `strength` blends between W and that."""
    dora_scale = _f32(dora_scale, w.device)
    calc = w + scaled_delta
    if dora_scale.shape[0] == calc.shape[0]:
        norm = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    calc = calc * (dora_scale / (norm + EPS))
    return calc if strength == 1.0 else w + strength * (calc - w)


def apply(term: LoraTerm, w: torch.Tensor, strength: float) -> torch.Tensor:
    """The float32 tensor `w` with the term applied at `strength`."""
    d = delta(term, w.device).reshape(w.shape)
    if term.dora_scale is None:
        return w + (strength * scale(term)) * d
    return decompose(w, d * scale(term), term.dora_scale, strength)


def term_fn(term: LoraTerm, strength: float) -> TensorFn:
    """`apply` as a function of the tensor, for a layer's `weight_fns` / `bias_fns`."""
    return lambda w: apply(term, w, strength)


def factor_fn(factor: LoraFactor, strength: float) -> TensorFn:
    """A plain LoRA merged at the cast, for layers whose patches must apply in order (one of them is not plain)."""
    s = strength * factor.scale

    def fn(w: torch.Tensor) -> torch.Tensor:
        return w + s * torch.mm(_f32(factor.up, w.device), _f32(factor.down, w.device))

    return fn
