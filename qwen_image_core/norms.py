"""RMSNorm of the DiT (text input norm and per-head QK norms), and the precision the QK norms compute in.

"float32" (the default, diffusers' numerics): the input upcast to float32, normalised and scaled by the float32
weight, rounded once to the input dtype. In float32 compute every mode is this.
"compute": in bf16 / fp16 compute the QK norms run as one `F.rms_norm` in the compute dtype with the weight cast
to it (ComfyUI's numerics). PyTorch's fused kernel (CUDA) reads and writes the compute dtype only: 4 bytes per
element instead of about 20 (upcast copy, float32 norm, downcast), gpu_review §A. Measured on CPU (torch 2.13):
bit for bit the float32 path whenever the weight is exact in the compute dtype (bf16-stored checkpoints: the
mean square and the scaling are computed in float32, rounded once); a float32 weight is rounded to bf16 first:
a tiny bf16 DiT forward then moves by 3.7e-3 of the output scale (max; mean 2.4e-3), against 5.2e-3 between bf16
and float32 compute (tests/test_norm_rope.py). Not measured on CUDA: an opt-in until bench/gpu_check.py has run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .ops import TensorFn, cast_weight

PRECISIONS = ("float32", "compute")


class RMSNorm(nn.Module):
    """RMSNorm with a learnt scale, computed in float32 and returned in the input dtype (`weight_fns`:
    active patches of the scale, as on `ops.Linear`); `precision` "compute": see the module docstring."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.weight_fns: tuple[TensorFn, ...] = ()
        self.precision = "float32"  # PRECISIONS; set by `using`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision == "compute" and x.dtype != torch.float32:
            w = cast_weight(self.weight, None, x.dtype, (), self.weight_fns)
            return F.rms_norm(x, x.shape[-1:], w, self.eps)
        w = cast_weight(self.weight, None, torch.float32, (), self.weight_fns)
        return F.rms_norm(x.float(), x.shape[-1:], w, self.eps).to(x.dtype)


def qk_norms(model: nn.Module) -> list[RMSNorm]:
    """The per-head QK norms of every attention block of an MMDiT (norm_q, norm_k, norm_added_q, norm_added_k)."""
    names = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
    return [getattr(b.attn, n) for b in model.transformer_blocks for n in names]


@contextmanager
def using(model: nn.Module, precision: str) -> Iterator[int]:
    """The QK norms of `model` in `precision` inside the block of code (restored after); yields how many."""
    if precision not in PRECISIONS:
        raise ValueError(f"QK norm precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    norms = qk_norms(model)
    saved = [n.precision for n in norms]
    try:
        for n in norms:
            n.precision = precision
        yield len(norms)
    finally:
        for n, p in zip(norms, saved, strict=True):
            n.precision = p
