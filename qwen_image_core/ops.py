"""Layers whose weights may be stored in a narrower dtype than they compute in.

A `Linear` keeps its weight in the storage dtype it was loaded with (bf16, fp16, fp32, or float8 with an
optional per-tensor scale) and casts it to the input's dtype at each call, one layer at a time. The
compute dtype therefore comes from the input, never from the module. Active LoRAs (see `lora.py`) are
added at that cast, in float32, so the stored weights are never modified; so are a host's other weight
patches (`weight_fns` / `bias_fns`: functions of the float32 tensor, e.g. ComfyUI's LoKr or diff patches).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# one active LoRA on a layer: (down [r, in], up [out, r], strength * alpha / r)
LoraPatch = tuple[torch.Tensor, torch.Tensor, float]
# a patch of a whole tensor: float32 tensor in, float32 tensor of the same shape out
TensorFn = Callable[[torch.Tensor], torch.Tensor]


def cast_weight(
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    dtype: torch.dtype,
    lora: tuple[LoraPatch, ...] = (),
    fns: tuple[TensorFn, ...] = (),
) -> torch.Tensor:
    """The weight in `dtype`: float8 dequantised as float32(weight) * scale, then LoRA deltas added and
    `fns` applied, in float32."""
    has_scale = scale is not None and scale.numel() > 0
    if not has_scale and not lora and not fns:
        return weight.to(dtype)
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
        self.lora: tuple[LoraPatch, ...] = ()
        self.weight_fns: tuple[TensorFn, ...] = ()
        self.bias_fns: tuple[TensorFn, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = cast_weight(self.weight, self.weight_scale, x.dtype, self.lora, self.weight_fns)
        b = None if self.bias is None else cast_weight(self.bias, None, x.dtype, (), self.bias_fns)
        return F.linear(x, w, b)
