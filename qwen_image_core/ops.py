"""Layers whose weights may be stored in a narrower dtype than they compute in.

A `Linear` keeps its weight in the storage dtype it was loaded with (bf16, fp16, fp32, or float8 with an
optional per-tensor scale) and casts it to the input's dtype at each call, one layer at a time. The
compute dtype therefore comes from the input, never from the module. Active LoRAs (see `lora.py`) are
added at that cast, in float32, so the stored weights are never modified; so are a host's other weight
patches (`weight_fns` / `bias_fns`: functions of the float32 tensor, e.g. ComfyUI's LoKr or diff patches).

Packed weights (int8 with scales, GGUF blocks, 4-bit formats...) are the same idea one step further: the
`weight` parameter holds the stored bytes as they are in the file (so they stay packed in memory and on the
bus), `quant` (a `Quant`) says how to turn them into a float weight, and the tensors it needs besides (scales,
zero points) are buffers of the layer named in `quant.extras`. `set_packed` installs one; formats/ decides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# one active LoRA on a layer: (down [r, in], up [out, r], strength * alpha / r)
LoraPatch = tuple[torch.Tensor, torch.Tensor, float]
# a patch of a whole tensor: float32 tensor in, float32 tensor of the same shape out
TensorFn = Callable[[torch.Tensor], torch.Tensor]


class Quant(Protocol):
    """The format of one layer's packed weight: what it is, its logical shape, and how to dequantise it."""

    name: str  # e.g. "int8_tensorwise", "gguf Q4_K" (shown in plans and errors)
    shape: tuple[int, ...]  # the float weight's shape, e.g. [out, in]
    extras: tuple[str, ...]  # the layer's buffers this format reads (scales, zero points, ...)

    def dequantize(self, packed: torch.Tensor, extras: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The float weight in `dtype` (`shape`), computed on `packed`'s device."""
        ...


def cast_weight(
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    dtype: torch.dtype,
    lora: tuple[LoraPatch, ...] = (),
    fns: tuple[TensorFn, ...] = (),
) -> torch.Tensor:
    """The weight in `dtype`. Scaled float8 alone is dequantised in `dtype` as weight.to(dtype) * scale.to(dtype)
    (ComfyUI's arithmetic, and no float32 temporary); with LoRA deltas or `fns` everything is float32 first."""
    has_scale = scale is not None and scale.numel() > 0
    if not has_scale and not lora and not fns:
        return weight.to(dtype)
    if not lora and not fns:
        return weight.to(dtype) * scale.to(device=weight.device, dtype=dtype)
    w = weight.to(torch.float32, copy=bool(fns))  # `fns` may work in place: never on the stored tensor
    if has_scale:
        w = w * scale.to(device=weight.device, dtype=torch.float32)
    for down, up, s in lora:
        w = w + s * (up.to(device=w.device, dtype=torch.float32) @ down.to(device=w.device, dtype=torch.float32))
    for fn in fns:
        w = fn(w)
    return w.to(dtype)


class Linear(nn.Linear):
    """nn.Linear that computes in the input's dtype and understands scaled float8 storage and LoRA patches.

    `weight_scale` is a non-persistent buffer (None unless the checkpoint has a scale), so the module's
    state-dict keys stay exactly `weight` / `bias` like the checkpoints'. `lora` holds the active LoRA
    factors, `weight_fns` / `bias_fns` other active patches of the weight / bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("weight_scale", None, persistent=False)
        self.quant: Quant | None = None  # set by `set_packed`: `weight` then holds packed bytes
        self.lora: tuple[LoraPatch, ...] = ()
        self.weight_fns: tuple[TensorFn, ...] = ()
        self.bias_fns: tuple[TensorFn, ...] = ()
        # a native quantised product (layer, x, bias) -> y set by `matmul.using` (None: dequantise, float GEMM)
        self.matmul: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b, plus each LoRA beside the layer: + s (x A^T) B^T in x's dtype (no weight-sized temporaries;
        GEMMs accumulate in float32 on GPUs). The factors are expected on x's device in x's dtype already
        (`lora_to`); otherwise they are converted here, per call."""
        if self.matmul is not None and not self.weight_fns:  # weight patches need the float weight
            return self._beside(x, self.matmul(self, x, self._bias(x.dtype)))
        return self.forward_with(x, self.compute_weight(x.dtype, lora=False))

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else cast_weight(self.bias, None, dtype, (), self.bias_fns)

    def forward_with(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """`forward` with the weight already computed (`compute_weight(x.dtype, lora=False)`): callers that apply
        one layer to several inputs read its weight once (e.g. `modulation.precompute`), with the same numbers."""
        return self._beside(x, F.linear(x, w, self._bias(x.dtype)))

    def _beside(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for down, up, s in self.lora:
            down, up = down.to(device=x.device, dtype=x.dtype), up.to(device=x.device, dtype=x.dtype)
            y = y + s * F.linear(F.linear(x, down), up)
        return y

    def compute_weight(self, dtype: torch.dtype, lora: bool = True) -> torch.Tensor:
        """The weight this layer computes with, in `dtype`: dequantised, patches (and, unless lora=False, the
        LoRAs: what the weight would be if they were merged, for inspection) added in float32."""
        factors = self.lora if lora else ()
        if self.quant is None:
            return cast_weight(self.weight, self.weight_scale, dtype, factors, self.weight_fns)
        patched = bool(factors or self.weight_fns)
        extras = {name: getattr(self, name) for name in self.quant.extras}
        w = self.quant.dequantize(self.weight, extras, torch.float32 if patched else dtype)
        return cast_weight(w, None, dtype, factors, self.weight_fns) if patched else w


def lora_to(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> int:
    """Move every active LoRA factor of `model`'s linear layers to `device` in `dtype` once (a run's compute
    device and dtype), so calls use them as they are; returns their bytes there."""
    total = 0
    for m in model.modules():
        if isinstance(m, Linear) and m.lora:
            m.lora = tuple((d.to(device, dtype), u.to(device, dtype), s) for d, u, s in m.lora)
            total += sum(d.numel() * d.element_size() + u.numel() * u.element_size() for d, u, _ in m.lora)
    return total


def set_packed(layer: Linear, packed: torch.Tensor, quant: Quant, extras: Mapping[str, torch.Tensor]) -> None:
    """Make `layer` hold a packed weight: the stored bytes as its `weight`, `quant` to dequantise them, and the
    extra tensors as buffers (persistent: they are part of the layer's state, saved and moved with it)."""
    install_packed(layer, packed, quant, extras, (layer.out_features, layer.in_features))


def install_packed(module: nn.Module, packed: torch.Tensor, quant: Quant, extras: Mapping[str, torch.Tensor],
                   shape: tuple[int, ...]) -> None:  # fmt: skip
    """`set_packed` for any module with a `weight` and a `quant` slot whose float weight has `shape`."""
    if tuple(quant.shape) != tuple(shape):
        raise ValueError(f"a packed {quant.name} weight of shape {list(quant.shape)} does not fit {list(shape)}")
    missing = set(quant.extras) - set(extras)
    if missing:
        raise ValueError(f"the {quant.name} weight needs {sorted(missing)}")
    module.weight = nn.Parameter(packed, requires_grad=False)
    module.quant = quant
    for name, t in extras.items():
        if name in module._buffers:
            del module._buffers[name]
        module.register_buffer(name, t, persistent=True)
