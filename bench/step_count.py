"""What one DiT block costs a GPU, counted on the CPU: GEMM FLOPs, attention FLOPs, memory bytes, kernels.

Eager: the block runs on the meta device (no memory, no arithmetic) under two counting modes.
  GEMM FLOPs        mm / addmm / bmm / _scaled_mm / _int_mm, by operand kind (bf16 or fp8 tensor cores)
  attention FLOPs   each F.scaled_dot_product_attention call, counted as one flash kernel (4 B H Lq Lk D) that
                    reads q, k, v and writes its output once; the call is answered with an empty tensor
  memory bytes      every other aten op that is not a view: the bytes of its tensor inputs and outputs, as an
                    eager GPU kernel reads and writes them (weight casts, norms, RoPE, modulation, copies...)
  kernels           the ops that launch a kernel (not views)
Compiled: inductor compiles the block on the CPU at the real widths and a few token counts; the bytes of its fused
kernels are read from the generated wrapper code (each kernel reads or writes each buffer it is passed once) and
extended linearly to the real token count. Inductor's fusion decisions are mostly device-independent; Triton on a
GPU may split a row reduction from its consumer where the CPU backend fused them (one more read of that input).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

VIEWS = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "unflatten", "slice", "select",
    "unsqueeze", "squeeze", "split", "split_with_sizes", "chunk", "unbind", "alias", "as_strided", "detach",
    "_reshape_alias", "lift_fresh", "narrow", "empty", "empty_like", "empty_strided", "new_empty",
}  # fmt: skip
GEMMS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_int_mm"}


@dataclass
class Count:
    gemm: Counter = field(default_factory=Counter)  # FLOPs by kind: "bf16 GEMM" / "fp8 GEMM"
    attention: float = 0.0  # FLOPs
    memory: float = 0.0  # bytes moved by the kernels that are neither GEMMs nor attention
    operands: float = 0.0  # bytes of GEMM activations in / results out and attention q, k, v, out
    kernels: int = 0
    extern: int = 0  # of which GEMMs and attention calls (library kernels, also when compiled)
    by_op: Counter = field(default_factory=Counter)  # memory bytes per aten op


def data(t: torch.Tensor) -> torch.Tensor:
    """The stored tensor of a ComfyUI QuantizedTensor (its fp8 data), else the tensor itself."""
    return getattr(t, "_qdata", t)


def nbytes(tensors) -> int:
    return sum(data(t).numel() * data(t).element_size() for t in tensors)


class CountOps(TorchDispatchMode):
    def __init__(self, count: Count):
        super().__init__()
        self.c = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in VIEWS:
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        self.c.kernels += 1
        if name in GEMMS:
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
            self.c.gemm["fp8 GEMM" if data(a).element_size() == 1 else "bf16 GEMM"] += 2 * a.numel() * b.shape[-1]
            self.c.extern += 1
            self.c.operands += nbytes((a, out))  # the weight is read by the GEMM itself (its FLOP time)
        else:
            self.c.memory += nbytes(tensors)
            self.c.by_op[name] += nbytes(tensors)
        return out


class CountAttention(TorchFunctionMode):
    def __init__(self, count: Count):
        super().__init__()
        self.c = count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        q, k, v = args[:3]
        b, h, lq, d = q.shape
        self.c.attention += 4 * b * h * lq * k.shape[-2] * d
        self.c.operands += nbytes((q, k, v)) + nbytes((q,))
        self.c.kernels += 1
        self.c.extern += 1
        return torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)


@contextmanager
def counting(count: Count):
    """Count what runs inside the block of code into `count` (no gradients)."""
    with torch.no_grad(), CountAttention(count), CountOps(count):
        yield


def block_inputs(cfg, device="meta", image: int = 6889, text: int = 256, rows: int = 2):
    """A block's inputs at `rows` x (`image` + `text`) tokens: img [R, N, D], txt [R, L, D], temb [R, D] (bf16), the
    RoPE table [N + L, hd/2, 2, 2] and the precomputed modulation (computed once per run: modulation.py); empty on
    the meta device, random elsewhere."""
    e = torch.empty if str(device) == "meta" else torch.randn
    img, txt = e(rows, image, cfg.hidden, device=device), e(rows, text, cfg.hidden, device=device)
    temb, pe = e(rows, cfg.hidden, device=device), e(image + text, cfg.head_dim // 2, 2, 2, device=device)
    mod = (e(rows, 6 * cfg.hidden, device=device).bfloat16(),) * 2
    return img.bfloat16(), txt.bfloat16(), temb.bfloat16(), pe, mod


def count_our_block(cfg, image: int, text: int, mode: str = "off", rows: int = 2) -> Count:
    """Our DoubleStreamBlock with fp8 weights counted on the meta device at `rows` x (`image` + `text`) tokens, in a
    matmul mode ("off": weights upcast per layer); the modulation precomputed, as a run does."""
    from qwen_image_core import matmul  # noqa: PLC0415
    from tools.checkpoints.dit import meta_model  # noqa: PLC0415

    block = meta_model("fp8", replace(cfg, num_layers=1)).transformer_blocks[0]
    img, txt, temb, pe, mod = block_inputs(cfg, "meta", image, text, rows)
    count = Count()
    with matmul.using(block, mode), counting(count):
        block(img, txt, temb, pe, None, None, mod=mod)
    return count


# -- compiled: inductor's fused kernels, read from its CPU wrapper code ------------------------------------------

ARG = re.compile(r"assert_size_stride\((arg\d+_\d+), \(([\d, ]*)\)")
ALLOC = re.compile(r"(buf\d+) = empty_strided_\w+\(\(([\d, ]*)\),.*(torch\.\w+)\)")
ALIAS = re.compile(r"(buf\d+) = reinterpret_tensor\((\w+), \(([\d, ]*)\)")
REUSE = re.compile(r"(buf\d+) = (buf\d+); del")
KERNEL = re.compile(r"^\s*(cpp_fused_\w+)\((.*)\)\s*$")


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace(" ", "").split(",") if v)


def fused_kernel_bytes(code: str, dtypes: dict[tuple[int, ...], torch.dtype]) -> tuple[int, int]:
    """(bytes, kernels) of the fused kernels in inductor's CPU wrapper `code`: each kernel reads or writes each
    buffer it is passed once; extern kernels (GEMMs, attention) are not counted. `dtypes`: the graph inputs'
    dtypes by shape (the wrapper prints their shapes only)."""
    bufs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    total = kernels = 0
    for line in code.splitlines():
        if m := ARG.search(line):
            bufs[m[1]] = (_shape(m[2]), dtypes.get(_shape(m[2]), torch.bfloat16))
        elif m := ALLOC.search(line):
            bufs[m[1]] = (_shape(m[2]), getattr(torch, m[3].split(".")[1]))
        elif (m := ALIAS.search(line)) and m[2] in bufs:
            bufs[m[1]] = (_shape(m[3]), bufs[m[2]][1])
        elif (m := REUSE.search(line)) and m[2] in bufs:
            bufs[m[1]] = bufs[m[2]]
        elif m := KERNEL.match(line):
            kernels += 1
            for name in dict.fromkeys(a.strip() for a in m[2].split(",")):
                if name in bufs:
                    shape, dtype = bufs[name]
                    total += math.prod(shape) * dtype.itemsize
    return total, kernels


def compiled_bytes(fn, *args, **kwargs) -> tuple[int, int]:
    """(fused-kernel bytes, fused kernels) of `fn(*args, **kwargs)` compiled by inductor on the CPU."""
    from torch._inductor.utils import run_and_get_code  # noqa: PLC0415

    flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    owner = getattr(fn, "__self__", None)
    params = list(owner.parameters()) if isinstance(owner, torch.nn.Module) else []
    dtypes = {tuple(t.shape): t.dtype for t in (*params, *flat)}
    torch._dynamo.reset()
    with torch.no_grad():
        _, codes = run_and_get_code(torch.compile(fn, dynamic=False), *args, **kwargs)
    counts = [fused_kernel_bytes(c, dtypes) for c in codes]
    return sum(b for b, _ in counts), sum(k for _, k in counts)
