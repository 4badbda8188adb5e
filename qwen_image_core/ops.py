"""Layers whose weights may be stored in a narrower dtype than they compute in.

A `Linear` keeps its weight in the storage dtype it was loaded with (bf16, fp16, fp32, or float8 with an
optional per-tensor scale) and casts it to the input's dtype at each call, one layer at a time. The
compute dtype therefore comes from the input, never from the module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def cast_weight(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype`; float8 weights are dequantised as float32(weight) * scale first."""
    if scale is None or scale.numel() == 0:
        return weight.to(dtype)
    return (weight.to(torch.float32) * scale.to(device=weight.device, dtype=torch.float32)).to(dtype)


class Linear(nn.Linear):
    """nn.Linear that computes in the input's dtype and understands scaled float8 storage.

    `weight_scale` is a non-persistent buffer (None unless the checkpoint has a scale), so the module's
    state-dict keys stay exactly `weight` / `bias` like the checkpoints'.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("weight_scale", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = cast_weight(self.weight, self.weight_scale, x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)
