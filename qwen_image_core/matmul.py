"""Native quantised matmuls for Linear layers, behind one seam (opt-in; the default dequantises the weight).

By default a float8 or int8 layer's weight is dequantised in the compute dtype and multiplied in a float GEMM
(`ops.Linear`): exact to the stored weight, but the GEMM runs at bf16 speed. A matmul mode instead quantises the
activation too and multiplies the quantised operands natively, which is faster on GPUs that have the units and
changes the numbers by the activation's quantisation (about 2^-4 relative per element for fp8, 2^-8 for int8):

- "fp8": layers whose weight is float8_e4m3fn (plain, scaled, or comfy_quant float8_e4m3fn) with a scale per
  tensor or per row. The activation is quantised per token (row): a = amax|x_row| / 448, x_q = e4m3(x / a).
  `torch._scaled_mm(x_q, W^T, a, w_scale, bias)` (float32 accumulation, the bias in the epilogue) on CUDA with
  SM >= 8.9 in bf16 and on the CPU (PyTorch's reference kernel); elsewhere the twin: the same quantised operands
  in float32, (x_q W^T) * a * w_scale + bias, rounded once.
- "int8": comfy_quant int8_tensorwise layers (per-tensor or per-row scale, ConvRot included). The activation is
  rotated per ConvRot group (x H), quantised per row (a = amax / 127, round half to even, clamp to [-128, 127]),
  multiplied by `torch._int_mm` (int32, exact; CUDA and CPU) and rescaled by a * w_scale in float32, as
  comfy-kitchen's `int8_linear` (its eager reference is this module's test oracle; when comfy-kitchen is
  importable its kernel serves CUDA inputs, never required).

Layers outside a mode (other formats, comfy_quant `full_precision_matrix_mult`, weights with patches such as LoKr
or diffs, e5m2 weights in fp8 mode) keep the dequantising path; LoRAs add beside the layer in both (`ops.Linear`).
`using(model, mode)` sets the mode on a model's layers for a block of code (the bridge: per forward, so MODELs of
one file may use different modes); `coverage` says how many layers a mode reaches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .ops import Linear
from .quant_comfy import hadamard

MODES = ("off", "fp8", "int8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0  # int8 activations are quantised to [-128, 127] with scale amax / 127
MIN_SCALE = 1e-30  # floor of an activation row's scale (an all-zero row)

# one native product: (layer, x [..., K] compute dtype, bias [N] or None) -> y [..., N] in x's dtype
Kernel = Callable[[Linear, torch.Tensor, torch.Tensor | None], torch.Tensor]


# -- activation quantisation (per row) -------------------------------------------------------------------------


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scale [M, 1]) with x ~ x_q * scale, scale = amax|row| / 448.

    e4m3(clamp(float32(x) / scale, +-448)) in two passes over x: the row maxima of |x| (one reduction, no |x|
    copy), then x / scale (promoted to float32 inside the kernel, no float32 copy of x first) and the cast. The
    clamp is implied: |x| / scale <= 448 (1 + 2^-23) (scale is amax / 448 rounded, or MIN_SCALE > amax / 448),
    which the cast rounds to 448 (e4m3fn's largest value; only >= 464 would round past it). Eager GPU traffic
    2 + 6 + 5 = 13 bytes per bf16 element instead of 35 (bench/bench_step.py); the same bits, NaN and inf rows
    included (tests/test_matmul_seam.py)."""
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True)  # max |x| per row, exact
    scale = (amax.float() / FP8_MAX).clamp(min=MIN_SCALE)
    return torch.div(x, scale).to(torch.float8_e4m3fn), scale


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 [M, K], float32 scale [M, 1]), scale = amax|row| / 127; x / scale in x's dtype, rounded
    half to even (comfy-kitchen's quantize_int8_rowwise)."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / INT8_MAX).clamp(min=MIN_SCALE)
    s = scale.to(x.dtype)
    s = torch.where(s == 0, torch.full_like(s, torch.finfo(x.dtype).tiny), s)  # a scale below x's dtype range
    return (x / s).round().clamp(-128.0, 127.0).to(torch.int8), scale


def rotate(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [..., K] with each group of `group` features multiplied by ConvRot's Hadamard matrix H, in x's dtype."""
    h = hadamard(group, x.device).to(x.dtype)
    return torch.matmul(x.reshape(-1, x.shape[-1] // group, group), h).reshape(x.shape)


# -- the products ----------------------------------------------------------------------------------------------


def fp8_capable(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` runs float8 on this device (CUDA SM >= 8.9, PyTorch's CPU kernel, or the meta
    device: shapes only, traced as on CUDA)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return (major, minor) >= (8, 9)
    return device.type in ("cpu", "meta") and hasattr(torch, "_scaled_mm")


def fp8_mm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, dtype: torch.dtype,
           native: bool = True, bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(xq [M, K] e4m3 * xs [M, 1]) (wq [N, K] e4m3 * ws [] or [N])^T + bias [N] in `dtype`, the bias added in
    float32 before the one rounding: `torch._scaled_mm` (the bias in its epilogue: no separate pass over the
    output), or with native=False the float32 twin (the same operands, scales and bias, float32 products and
    sums). On CUDA the row-wise kernels write bf16 (fp16 only in recent PyTorch, float32 only through cuBLAS on
    SM 9.0: "Only bf16 ... high precision output types are supported for row-wise scaling"): other dtypes take the
    twin there (`native_dtype`)."""
    ws = ws.reshape(1, -1) if ws.numel() > 1 else ws.reshape(1, 1)
    if native:
        wsr = ws.expand(1, wq.shape[0]).contiguous()  # row-wise scaling wants both scales per row / column
        b = None if bias is None else bias.to(dtype)
        return torch._scaled_mm(xq, wq.t(), scale_a=xs.contiguous(), scale_b=wsr, bias=b, out_dtype=dtype)
    y = (xq.float() @ wq.float().t()) * (xs * ws)
    return (y if bias is None else y + bias.float()).to(dtype)


def native_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._scaled_mm` writes `dtype` on `device` with row-wise scales in every PyTorch we support
    (CUDA: bf16)."""
    return device.type != "cuda" or dtype == torch.bfloat16


def int8_mm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(xq [M, K] int8 * xs [M, 1]) (wq [N, K] int8 * ws [] or [N])^T in `dtype`: int32 products (`torch._int_mm`,
    padded to its shape rules on CUDA) rescaled in float32."""
    m, k, n = xq.shape[0], xq.shape[1], wq.shape[0]
    a, b = xq, wq.t()
    if xq.is_cuda:  # cuBLASLt: M > 16 and K, N multiples of 8
        pm, pk, pn = max(32, -(-m // 32) * 32), -(-k // 8) * 8, -(-n // 8) * 8
        a = torch.nn.functional.pad(a, (0, pk - k, 0, pm - m))
        b = torch.nn.functional.pad(b, (0, pn - n, 0, pk - k))
    acc = torch._int_mm(a.contiguous(), b.contiguous())[:m, :n]  # [M, N] int32
    ws = ws.reshape(1, -1) if ws.numel() > 1 else ws.reshape(1, 1)
    return (acc.float() * (xs * ws)).to(dtype)


def _fp8_parts(layer: Linear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(e4m3 weight [N, K], float32 scale [] or [N]) of a layer the fp8 mode covers, else None."""
    q = layer.quant
    if q is None:
        if layer.weight.dtype != torch.float8_e4m3fn:
            return None
        s = layer.weight_scale
        scale = torch.ones((), device=layer.weight.device) if s is None or s.numel() == 0 else s.float().reshape(-1)
        return layer.weight, scale
    if getattr(q, "kind", "") != "fp8" or q.full_precision or q.fp8 != torch.float8_e4m3fn:
        return None
    p = q.parts(layer.weight, {n: getattr(layer, n) for n in q.extras})
    return p["fp8"], p["scale"]


def _int8_parts(layer: Linear) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    q = layer.quant
    if q is None or getattr(q, "kind", "") != "int8" or q.full_precision:
        return None
    p = q.parts(layer.weight, {n: getattr(layer, n) for n in q.extras})
    return p["int8"], p["scale"].float(), p["convrot"]


def fp8_kernel(layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    wq, ws = _fp8_parts(layer)
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_rows_fp8(x2)
    native = fp8_capable(x.device) and native_dtype(x.device, x.dtype)
    y = fp8_mm(xq, xs, wq, ws.to(x.device), x.dtype, native=native, bias=bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _kitchen_int8() -> Callable | None:
    try:
        import comfy_kitchen  # noqa: PLC0415  (optional: newer ComfyUI ships it)
    except ImportError:
        return None
    return getattr(comfy_kitchen, "int8_linear", None)


def int8_kernel(layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    wq, ws, group = _int8_parts(layer)
    kitchen = _kitchen_int8() if x.is_cuda else None
    if kitchen is not None:
        return kitchen(x, wq, ws, bias, x.dtype, convrot=bool(group), convrot_groupsize=group or 256)
    xr = rotate(x, group) if group else x
    x2 = xr.reshape(-1, x.shape[-1])
    xq, xs = quantize_rows_int8(x2)
    y = int8_mm(xq, xs, wq, ws.to(x.device), x.dtype)
    y = y if bias is None else y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


KERNELS: dict[str, tuple[Callable[[Linear], object], Kernel]] = {
    "fp8": (_fp8_parts, fp8_kernel),
    "int8": (_int8_parts, int8_kernel),
}


def covered(model: nn.Module, mode: str) -> list[Linear]:
    """The Linear layers of `model` that `mode` multiplies natively (weights with patches are left out per call)."""
    if mode not in MODES:
        raise ValueError(f"matmul mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "off":
        return []
    parts = KERNELS[mode][0]
    return [m for m in model.modules() if isinstance(m, Linear) and parts(m) is not None]


def coverage(model: nn.Module, mode: str) -> str:
    """A line for the UI: how many Linear layers the mode reaches."""
    if mode == "off":
        return "matmul: dequantised weights, float GEMMs"
    n, total = len(covered(model, mode)), sum(isinstance(m, Linear) for m in model.modules())
    if n == 0:
        return f"matmul {mode}: no layer of this model is stored in a form it multiplies natively; float GEMMs"
    return f"matmul {mode}: {n} of {total} linear layers native, the rest dequantised"


@contextmanager
def using(model: nn.Module, mode: str) -> Iterator[int]:
    """`mode` on the model's covered layers inside the block (restored after); yields how many it covers."""
    layers = covered(model, mode)
    saved = [m.matmul for m in layers]
    kernel = KERNELS[mode][1] if layers else None
    try:
        for m in layers:
            m.matmul = kernel
        yield len(layers)
    finally:
        for m, k in zip(layers, saved, strict=True):
            m.matmul = k
