"""GGUF (ggml) weight types in torch: their block layouts as data, one vectorised dequantiser per type.

A ggml type stores each row of a tensor as blocks of `block` values in `nbytes` bytes (F32 / F16 / BF16 are
blocks of one value). The layouts below are ggml's (`ggml-common.h`): where each field of a block lies and how
wide it is; `d` / `dmin` / `m` are float16 scales and minima, the rest packed integers. A packed weight is the
stored uint8 tensor [rows, bytes per row] exactly as it lies in the file; `dequantize` turns it into floats on
the tensor's own device with torch ops only (no numpy, no copy to the host). Every dequantiser repeats the
float32 products and sums of the `gguf` package's reference (`gguf.quants.dequantize`) in the same order, so
the results are equal bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: its number in GGUF files, values and bytes per block, and the block's fields."""

    name: str
    id: int
    block: int  # values per block
    nbytes: int  # bytes per block
    fields: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # field -> (byte offset, byte length)
    plain: torch.dtype | None = None  # the torch dtype of an unquantised type (F32 / F16 / BF16)

    @property
    def bytes_per_value(self) -> float:
        return self.nbytes / self.block


QK = 256  # values per super-block of the k-quants
# The types this module reads (every type of the published Qwen-Image GGUFs).
TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("F32", 0, 1, 4, plain=torch.float32),
    GGMLType("F16", 1, 1, 2, plain=torch.float16),
    GGMLType("BF16", 30, 1, 2, plain=torch.bfloat16),
    GGMLType("Q4_0", 2, 32, 18, {"d": (0, 2), "qs": (2, 16)}),
    GGMLType("Q4_1", 3, 32, 20, {"d": (0, 2), "m": (2, 2), "qs": (4, 16)}),
    GGMLType("Q5_0", 6, 32, 22, {"d": (0, 2), "qh": (2, 4), "qs": (6, 16)}),
    GGMLType("Q5_1", 7, 32, 24, {"d": (0, 2), "m": (2, 2), "qh": (4, 4), "qs": (8, 16)}),
    GGMLType("Q8_0", 8, 32, 34, {"d": (0, 2), "qs": (2, 32)}),
    GGMLType("Q2_K", 10, QK, 84, {"scales": (0, 16), "qs": (16, 64), "d": (80, 2), "dmin": (82, 2)}),
    GGMLType("Q3_K", 11, QK, 110, {"hmask": (0, 32), "qs": (32, 64), "scales": (96, 12), "d": (108, 2)}),
    GGMLType("Q4_K", 12, QK, 144, {"d": (0, 2), "dmin": (2, 2), "scales": (4, 12), "qs": (16, 128)}),
    GGMLType("Q5_K", 13, QK, 176, {"d": (0, 2), "dmin": (2, 2), "scales": (4, 12), "qh": (16, 32), "qs": (48, 128)}),
    GGMLType("Q6_K", 14, QK, 210, {"ql": (0, 128), "qh": (128, 64), "scales": (192, 16), "d": (208, 2)}),
)}  # fmt: skip
HALF_FIELDS = ("d", "dmin", "m")  # the float16 fields of a block
# Types a GGUF file may hold that this module does not read: (name, values per block, bytes per block), so a
# reader can walk past them and name them.
OTHER_TYPES: dict[int, tuple[str, int, int]] = {
    9: ("Q8_1", 32, 40), 15: ("Q8_K", QK, 292), 16: ("IQ2_XXS", QK, 66), 17: ("IQ2_XS", QK, 74),
    18: ("IQ3_XXS", QK, 98), 19: ("IQ1_S", QK, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", QK, 110),
    22: ("IQ2_S", QK, 82), 23: ("IQ4_XS", QK, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4),
    27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", QK, 56), 34: ("TQ1_0", QK, 54), 35: ("TQ2_0", QK, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}  # fmt: skip
BY_ID = {t.id: t for t in TYPES.values()}


# ---------------------------------------------------------------------------------------------------------
# Field access and bit unpacking
# ---------------------------------------------------------------------------------------------------------


def _raw(b: torch.Tensor, t: GGMLType, name: str) -> torch.Tensor:
    """The bytes of one field of every block: uint8 [blocks, length]."""
    o, n = t.fields[name]
    return b[:, o : o + n]


def _half(b: torch.Tensor, t: GGMLType, name: str) -> torch.Tensor:
    """A float16 field of every block as float32 [blocks, 1]."""
    return _raw(b, t, name).contiguous().view(torch.float16).to(torch.float32)


NIBBLES, CRUMBS, BITS = (0, 4), (0, 2, 4, 6), tuple(range(8))
_SHIFTS: dict[tuple, torch.Tensor] = {}  # (device, shifts, dim) -> uint8 shift amounts shaped for broadcasting


def _split(x: torch.Tensor, shifts: tuple[int, ...], mask: int, dim: int = -2) -> torch.Tensor:
    """(x >> s) & mask for each shift s along a new axis: uint8 [..., k] -> [..., len(shifts), k] (dim=-2) or
    [..., k, len(shifts)] (dim=-1). One broadcast shift and an in-place mask."""
    key = (x.device, shifts, dim)
    s = _SHIFTS.get(key)
    if s is None:
        s = _SHIFTS[key] = torch.tensor(shifts, dtype=torch.uint8, device=x.device).reshape((-1, 1)[:-dim])
    return (x.unsqueeze(dim) >> s).bitwise_and_(mask)


def _low_high(qs: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """4-bit values: each group of bytes gives its low nibbles, then its high nibbles. [n, groups * 2, k]."""
    return _split(qs.reshape(n, groups, -1), NIBBLES, 0x0F).reshape(n, groups * 2, -1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """Bit i of a little-endian 32-bit field, i = 0..31 (the fifth bit of value i in Q5_0 / Q5_1)."""
    return _split(qh, BITS, 1, dim=-1).reshape(qh.shape[0], 32)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: eight 6-bit scales and eight 6-bit minima packed in 12 bytes -> two uint8 [n, 8]."""
    s = s.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    scale = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    low = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scale, low


def _float(q: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Small integer codes (uint8) minus `offset` as float32, the subtraction exact in int8 first."""
    return (q.view(torch.int8) - offset if offset else q).to(torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Dequantisers: uint8 blocks [n, nbytes] -> float32 values [n, block]. The float steps are gguf's, in its order
# (a product, then a sum), done in place on the one float32 buffer.
# ---------------------------------------------------------------------------------------------------------


def _q4_0(b, t):
    q = _low_high(_raw(b, t, "qs"), b.shape[0], 1).reshape(b.shape[0], -1)
    return _float(q, 8).mul_(_half(b, t, "d"))


def _q4_1(b, t):
    q = _low_high(_raw(b, t, "qs"), b.shape[0], 1).reshape(b.shape[0], -1)
    return _float(q).mul_(_half(b, t, "d")).add_(_half(b, t, "m"))


def _q5(b, t):
    low = _low_high(_raw(b, t, "qs"), b.shape[0], 1).reshape(b.shape[0], -1)
    return low.bitwise_or_(_bits32(_raw(b, t, "qh")).bitwise_left_shift_(4))


def _q5_0(b, t):
    return _float(_q5(b, t), 16).mul_(_half(b, t, "d"))


def _q5_1(b, t):
    return _float(_q5(b, t)).mul_(_half(b, t, "d")).add_(_half(b, t, "m"))


def _q8_0(b, t):
    return _raw(b, t, "qs").contiguous().view(torch.int8).to(torch.float32).mul_(_half(b, t, "d"))


def _q2_k(b, t):
    n, s = b.shape[0], _raw(b, t, "scales")
    dl = (_half(b, t, "d") * (s & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (_half(b, t, "dmin") * (s >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = _split(_raw(b, t, "qs").reshape(n, 2, 32), CRUMBS, 3).reshape(n, 16, 16)
    return _float(q).mul_(dl).sub_(ml).reshape(n, QK)


def _q3_k(b, t):
    n, s = b.shape[0], _raw(b, t, "scales")
    low = _split(s[:, :8], NIBBLES, 0x0F).reshape(n, 16)
    high = _split(s[:, 8:], CRUMBS, 3).reshape(n, 16)
    dl = (_half(b, t, "d") * _float(low.bitwise_or_(high.bitwise_left_shift_(4)), 32)).reshape(n, 16, 1)
    ql = _split(_raw(b, t, "qs").reshape(n, 2, 32), CRUMBS, 3).reshape(n, 16, 16)
    qh = _split(_raw(b, t, "hmask").reshape(n, 1, 32), BITS, 1).reshape(n, 16, 16)
    offset = qh.bitwise_xor_(1).bitwise_left_shift_(2)  # 4 where the mask bit is clear
    return (ql.view(torch.int8) - offset.view(torch.int8)).to(torch.float32).mul_(dl).reshape(n, QK)


def _k_affine(b, t, q):
    """Q4_K / Q5_K: d * scale_j * q - dmin * min_j for the eight 32-value groups j."""
    n = b.shape[0]
    scale, low = _k_scales(_raw(b, t, "scales"))
    d = (_half(b, t, "d") * scale.to(torch.float32)).reshape(n, 8, 1)
    dm = (_half(b, t, "dmin") * low.to(torch.float32)).reshape(n, 8, 1)
    return _float(q).mul_(d).sub_(dm).reshape(n, QK)


def _q4_k(b, t):
    return _k_affine(b, t, _low_high(_raw(b, t, "qs"), b.shape[0], 4))


def _q5_k(b, t):
    n = b.shape[0]
    high = _split(_raw(b, t, "qh").reshape(n, 1, 32), BITS, 1).reshape(n, 8, 32)
    return _k_affine(b, t, _low_high(_raw(b, t, "qs"), n, 4).bitwise_or_(high.bitwise_left_shift_(4)))


def _q6_k(b, t):
    n = b.shape[0]
    scale = _raw(b, t, "scales").contiguous().view(torch.int8).to(torch.float32)
    d = (_half(b, t, "d") * scale).reshape(n, 16, 1)
    low = _low_high(_raw(b, t, "ql"), n, 2).reshape(n, 8, 32)
    high = _split(_raw(b, t, "qh").reshape(n, 2, 32), CRUMBS, 3).reshape(n, 8, 32)
    q = low.bitwise_or_(high.bitwise_left_shift_(4)).reshape(n, 16, 16)
    return _float(q, 32).mul_(d).reshape(n, QK)


DEQUANTIZERS: dict[str, Callable[[torch.Tensor, GGMLType], torch.Tensor]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}  # fmt: skip


CPU_CHUNK = 1 << 22  # values per piece on the CPU: the temporaries stay small (cache-sized, reused by malloc)


def dequantize(packed: torch.Tensor, t: GGMLType, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of a stored tensor (uint8 bytes, any shape, row-major as in the file) as `dtype` in `shape`,
    computed on `packed`'s device. Quantised types are dequantised in float32 and then cast (on the CPU piece by
    piece into the output; on an accelerator in one pass)."""
    if t.plain is not None:
        return packed.reshape(-1).view(t.plain).reshape(shape).to(dtype)
    blocks, fn = packed.reshape(-1, t.nbytes), DEQUANTIZERS[t.name]
    step = max(1, CPU_CHUNK // t.block)
    if blocks.device.type != "cpu" or blocks.shape[0] <= step:
        return fn(blocks, t).reshape(shape).to(dtype)
    out = torch.empty(blocks.shape[0], t.block, dtype=dtype)
    for i in range(0, blocks.shape[0], step):
        out[i : i + step] = fn(blocks[i : i + step], t)  # the same rounding as .to(dtype)
    return out.reshape(shape)


@dataclass(frozen=True)
class GGUFQuant:
    """A GGUF weight (`ops.Quant`): the stored blocks [out, bytes per row] of an [out, in] linear weight, or of a
    token embedding [vocab, width] (`gather`)."""

    type: GGMLType
    shape: tuple[int, ...]
    extras: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"gguf {self.type.name}"

    def dequantize(self, packed: torch.Tensor, extras: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize(packed, self.type, self.shape, dtype)

    def gather(self, packed: torch.Tensor, extras, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of an embedding table (a token embedding stored in GGUF blocks): only those rows are
        dequantised (each row is whole blocks), [*ids.shape, width], equal to the same rows of `dequantize`."""
        rows = packed[ids.reshape(-1).to(packed.device)]
        return dequantize(rows, self.type, (*ids.shape, self.shape[-1]), dtype)
