"""ComfyUI's `comfy_quant` weight formats (as comfy-kitchen defines them) as `ops.Quant`s: dequantisation only.

One frozen dataclass per format holds the layer's logical shape [out, in] and the format's parameters (group
sizes, flags); the tensors stay on the layer: `weight` is the stored bytes as they lie in the file, the others
are buffers named as in the file (`weight_scale`, `weight_scale_2`, ...; `extras` lists those a layer has).
`dequantize` rebuilds the float weight on the tensor's own device with vectorised torch ops, in float32, and
casts it to the compute dtype last. `parts` hands the raw pieces to a native matmul (int8 / fp8 kernels) in
one documented form; nothing here multiplies.

Layouts (comfy-kitchen 0.2.40, `comfy_kitchen/tensor/*.py` and `backends/eager/*.py`):
* fp8: W = float(q) * weight_scale (per tensor).
* int8: W = q * s, s per tensor or per row; with ConvRot the stored rows were rotated group-wise (group g, a
  power of 4) by the regular Hadamard matrix H (Kronecker powers of H4 / sqrt(g), symmetric, H H = I), so
  the weight is unrotated as W = (q * s) H per group.
* nvfp4: e2m1 codes two per byte, the even column in the high nibble; fp8 e4m3 scales per 16 values in
  cuBLAS's swizzled tile layout (128 x 4 tiles), times the float32 `weight_scale_2`; rows and columns padded
  to multiples of 16 (the padding is cut off).
* mxfp8: fp8 e4m3 values, e8m0 (power of two) scales per 32 values in the same swizzled layout, padded to 32.
* asym_w4a8_int8: 4-bit codes (even column in the low nibble; 6-bit rows add a plane of the top 2 bits),
  decoded through a 16-entry codebook (else code - 8), times the per-group `weight_s_rel`, rounded onto the
  int8 grid, times the per-row `weight_s_channel` (+ the optional per-group `weight_correction`), unrotated.
* awq_w4a16: unsigned 4-bit codes (even column low), W = (q - 8) * scale + zero per group of columns
  (`weight_scale` / `weight_zeros` are [in / group, out]).
* convrot_w4a4: signed 4-bit codes (even column low) times a per-row scale, unrotated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

F32 = torch.float32
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_LUTS: dict[tuple, torch.Tensor] = {}


# -- shared pieces -----------------------------------------------------------------------------------------


def hadamard(group: int, device: torch.device) -> torch.Tensor:
    """The regular Hadamard matrix of size `group` (a power of 4): Kronecker powers of H4 over sqrt(group),
    float32, symmetric and orthogonal (H H = I). Cached per size and device."""
    key = ("hadamard", group, str(device))
    if key not in _LUTS:
        h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=F32)
        h = h4
        while h.shape[0] < group:
            h = torch.kron(h, h4)
        if group < 4 or h.shape[0] != group:
            raise ValueError(f"a ConvRot group must be a power of 4, not {group}")
        _LUTS[key] = (h / group**0.5).to(device)
    return _LUTS[key]


def unrotate(w: torch.Tensor, group: int) -> torch.Tensor:
    """w [..., K] (float32) with each group of K columns multiplied by H (the rotation undone: H H = I)."""
    shape = w.shape
    return torch.matmul(w.reshape(-1, shape[-1] // group, group), hadamard(group, w.device)).reshape(shape)


def unswizzle(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Block scales from cuBLAS's tiled layout (tiles of 128 rows x 4 columns; in a tile, row 32 i + j,
    column c lies at [j, i, c]) back to [rows, cols]."""
    r, c = -(-rows // 128), -(-cols // 4)
    if blocked.numel() != r * c * 512:
        raise ValueError(f"{blocked.numel()} block scales do not tile {rows} x {cols} (need {r * 128} x {c * 4})")
    tiles = blocked.reshape(r, c, 32, 4, 4).permute(0, 3, 2, 1, 4)  # [tile row, i, j, tile col, c]
    return tiles.reshape(r * 128, c * 4)[:rows, :cols]


def byte_lut(name: str, device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the two values each byte holds, in column order, for a 4-bit code `name`."""
    key = (name, str(device))
    if key not in _LUTS:
        b = torch.arange(256)
        lo, hi = b & 15, b >> 4
        if name == "e2m1":  # even column high
            t = torch.tensor(E2M1)
            pair = (t[hi], t[lo])
        elif name == "int4":  # signed, even column low
            pair = (lo - 16 * (lo >= 8), hi - 16 * (hi >= 8))
        elif name == "uint4-8":  # unsigned minus 8, even column low
            pair = (lo - 8, hi - 8)
        else:
            raise ValueError(name)
        _LUTS[key] = torch.stack(pair, -1).to(device=device, dtype=F32)
    return _LUTS[key]


def decode_bytes(packed: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """[rows, bytes] of packed codes -> [rows, 2 * bytes] float32 through a [256, 2] byte table."""
    idx = packed.view(torch.uint8).reshape(-1).to(torch.int32)
    return lut.index_select(0, idx).reshape(packed.shape[0], -1)


def _scale(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=F32)


def _row_scale(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-row scale ([N], [N, 1]) in a form that broadcasts over [N, K]."""
    s = _scale(s, like)
    return s.reshape(()) if s.numel() == 1 else s.reshape(-1, 1)


def _finish(w: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    if tuple(w.shape) != tuple(shape):
        w = w[: shape[0], : shape[1]]
    return w.to(dtype)


def _pre_quant(w: torch.Tensor, extras: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """ModelOpt's AWQ smoothing: ComfyUI multiplies the input by `pre_quant_scale` [in]; folded into W's columns."""
    pqs = extras.get("pre_quant_scale")
    return w if pqs is None else w * _scale(pqs, w).reshape(1, -1)


# -- the formats -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Float8:
    """float8_e4m3fn / float8_e5m2 with a per-tensor `weight_scale`; `input_scale` (optional) is the static
    activation scale ComfyUI quantises inputs with on its native fp8 matmul. Float compute does not quantise
    activations (as ComfyUI's own dequantising path), so it is kept only for a native fp8 seam."""

    shape: tuple[int, int]
    fp8: torch.dtype = torch.float8_e4m3fn
    extras: tuple[str, ...] = ("weight_scale",)
    full_precision: bool = False  # comfy_quant `full_precision_matrix_mult`: never a native matmul
    kind = "fp8"

    @property
    def name(self) -> str:
        return str(self.fp8).removeprefix("torch.")

    def dequantize(self, packed, extras, dtype):
        return packed.to(F32).mul_(_scale(extras["weight_scale"], packed).reshape(())).to(dtype)

    def gather(self, packed, extras, ids, dtype):
        """Rows `ids` of an embedding table, only those dequantised."""
        return (packed[ids].to(F32) * _scale(extras["weight_scale"], packed).reshape(())).to(dtype)

    def parts(self, packed, extras):
        """fp8 [out, in], float32 scale [], float32 input scale [] or None."""
        scale = _scale(extras["weight_scale"], packed).reshape(())
        inp = extras.get("input_scale")
        return {"fp8": packed, "scale": scale, "input_scale": None if inp is None else _scale(inp, packed).reshape(())}


@dataclass(frozen=True)
class Int8:
    """int8_tensorwise: int8 [out, in] times a float32 scale per tensor or per row; `convrot` = the ConvRot
    group size (0: not rotated)."""

    shape: tuple[int, int]
    convrot: int = 0
    extras: tuple[str, ...] = ("weight_scale",)
    full_precision: bool = False
    kind = "int8"

    @property
    def name(self) -> str:
        return f"int8_tensorwise (convrot {self.convrot})" if self.convrot else "int8_tensorwise"

    def dequantize(self, packed, extras, dtype):
        w = packed.to(F32).mul_(_row_scale(extras["weight_scale"], packed))
        return (unrotate(w, self.convrot) if self.convrot else w).to(dtype)

    def gather(self, packed, extras, ids, dtype):
        s = _row_scale(extras["weight_scale"], packed)
        rows = packed[ids].to(F32) * (s if s.ndim == 0 else s.reshape(-1)[ids].unsqueeze(-1))
        return (unrotate(rows, self.convrot) if self.convrot else rows).to(dtype)

    def parts(self, packed, extras):
        """int8 [out, in] (rotated when convrot), float32 scale [] or [out], the ConvRot group (0: none): a
        native kernel rotates the activation by the same H per group, quantises it per row, multiplies in
        int8 and rescales by scale x activation scale (comfy-kitchen's int8_linear)."""
        s = _scale(extras["weight_scale"], packed)
        return {"int8": packed, "scale": s.reshape(()) if s.numel() == 1 else s.reshape(-1), "convrot": self.convrot}


@dataclass(frozen=True)
class NVFP4:
    """nvfp4: e2m1 pairs in uint8 [rows16, cols16 / 2], fp8 block scales (16 values) in `weight_scale`, the
    float32 tensor scale `weight_scale_2`; optional `input_scale` (activation tensor scale of the native
    path, unused in float compute) and `pre_quant_scale` (input smoothing, folded into the weight)."""

    shape: tuple[int, int]
    extras: tuple[str, ...] = ("weight_scale", "weight_scale_2")
    full_precision: bool = False
    name = "nvfp4"
    kind = "nvfp4"
    pad = 16

    def dequantize(self, packed, extras, dtype):
        rows, k = packed.shape[0], packed.shape[1] * 2
        vals = decode_bytes(packed, byte_lut("e2m1", packed.device))
        blocks = unswizzle(extras["weight_scale"].view(torch.float8_e4m3fn), rows, k // 16).to(F32)
        scale = _scale(extras["weight_scale_2"], packed).reshape(()) * blocks
        w = vals.view(rows, k // 16, 16).mul_(scale.unsqueeze(-1)).view(rows, k)
        return _finish(_pre_quant(w[: self.shape[0], : self.shape[1]], extras), self.shape, dtype)

    def refit(self, shape):
        return _refit(self, shape)

    def parts(self, packed, extras):
        return {"fp4x2": packed, **{k: extras[k] for k in self.extras}}


@dataclass(frozen=True)
class MXFP8:
    """mxfp8: fp8 e4m3 [rows32, cols32], e8m0 block scales (32 values) in `weight_scale` (swizzled); optional
    `input_scale` (unused in float compute)."""

    shape: tuple[int, int]
    extras: tuple[str, ...] = ("weight_scale",)
    full_precision: bool = False
    name = "mxfp8"
    kind = "mxfp8"
    pad = 32

    def dequantize(self, packed, extras, dtype):
        rows, k = packed.shape
        e = unswizzle(extras["weight_scale"].view(torch.uint8), rows, k // 32).to(torch.int32)
        scale = torch.where(e == 0, 0, e << 23).view(F32)  # e8m0: 2^(e - 127), and 0 for e = 0 (as kitchen)
        w = packed.to(F32).view(rows, k // 32, 32).mul_(scale.unsqueeze(-1)).view(rows, k)
        return _finish(w, self.shape, dtype)

    def refit(self, shape):
        return _refit(self, shape)

    def parts(self, packed, extras):
        return {"fp8": packed, "block_scale": extras["weight_scale"]}


def _refit(q, shape):
    """The same packed weight read as a layer of `shape`, if its padded storage is exactly that shape's."""
    up = tuple(-(-s // q.pad) * q.pad for s in shape)
    return replace(q, shape=tuple(shape)) if up == tuple(-(-s // q.pad) * q.pad for s in q.shape) else None


@dataclass(frozen=True)
class W4A8:
    """asym_w4a8_int8: codes in int8 [out, in / 2] (4 bits) or [out, 3 in / 4] (6 bits), `weight_s_rel`
    [out, in / group] (fp8 or float32), `weight_s_channel` [out], optional `weight_codebook` [16] and
    `weight_correction` [in / group, out]; ConvRot-rotated with group `convrot`."""

    shape: tuple[int, int]
    group: int = 16
    convrot: int = 256
    extras: tuple[str, ...] = ("weight_s_rel", "weight_s_channel")
    full_precision: bool = False
    name = "asym_w4a8_int8"
    kind = "w4a8"

    def codes(self, packed) -> torch.Tensor:
        n, k = self.shape
        b = packed.view(torch.uint8).to(torch.int32)
        codes = torch.stack((b[:, : k // 2] & 15, b[:, : k // 2] >> 4), -1).reshape(n, k)
        if packed.shape[1] * 8 == k * 6:  # the plane of top bits: column c in byte c // 4 at bit 2 (c % 4)
            shifts = torch.tensor([0, 2, 4, 6], device=packed.device, dtype=torch.int32)
            codes = codes | (((b[:, k // 2 :].unsqueeze(-1) >> shifts) & 3).reshape(n, k) << 4)
        return codes

    def dequantize(self, packed, extras, dtype):
        n, k = self.shape
        six = packed.shape[1] * 8 == k * 6
        book = extras.get("weight_codebook")
        if book is not None and not six:
            lo_hi = _scale(book, packed)
            lut = torch.stack((lo_hi.repeat(16), lo_hi.repeat_interleave(16)), -1)  # byte -> (book[lo], book[hi])
            vals = decode_bytes(packed[:, : k // 2], lut)
        else:
            vals = self.codes(packed).to(F32) - (32.0 if six else 8.0)
        groups = k // self.group
        w = vals.view(n, groups, self.group).mul_(_scale(extras["weight_s_rel"], packed).unsqueeze(-1)).round_()
        w = w.clamp_(-127, 127).mul_(_scale(extras["weight_s_channel"], packed).view(n, 1, 1))
        corr = extras.get("weight_correction")
        if corr is not None:
            w = w.add_(_scale(corr, packed).t().unsqueeze(-1))
        return unrotate(w.view(n, k), self.convrot).to(dtype)

    def parts(self, packed, extras):
        return {"codes": packed, **{k: extras[k] for k in self.extras}, "group": self.group, "convrot": self.convrot}


@dataclass(frozen=True)
class AWQ:
    """awq_w4a16: unsigned 4-bit codes in int8 [out, in / 2]; `weight_scale` and `weight_zeros` [in / group,
    out] (bf16 / fp16 / fp32): W = (q - 8) * scale + zero."""

    shape: tuple[int, int]
    group: int = 64
    extras: tuple[str, ...] = ("weight_scale", "weight_zeros")
    full_precision: bool = False
    name = "awq_w4a16"
    kind = "awq"

    def dequantize(self, packed, extras, dtype):
        n, k = self.shape
        vals = decode_bytes(packed, byte_lut("uint4-8", packed.device)).view(n, k // self.group, self.group)
        scale = _scale(extras["weight_scale"], packed).t().unsqueeze(-1)
        zeros = _scale(extras["weight_zeros"], packed).t().unsqueeze(-1)
        return vals.mul_(scale).add_(zeros).view(n, k).to(dtype)

    def parts(self, packed, extras):
        return {
            "uint4x2": packed,
            "scale": extras["weight_scale"],
            "zeros": extras["weight_zeros"],
            "group": self.group,
        }


@dataclass(frozen=True)
class ConvRotW4A4:
    """convrot_w4a4: signed 4-bit codes in int8 [out, in / 2] times a float32 scale per row, ConvRot-rotated;
    `linear_dtype` is the native kernel's activation type (int4 / int8), irrelevant to dequantisation."""

    shape: tuple[int, int]
    convrot: int = 256
    linear_dtype: str = "int4"
    extras: tuple[str, ...] = ("weight_scale",)
    full_precision: bool = False
    name = "convrot_w4a4"
    kind = "w4a4"

    def dequantize(self, packed, extras, dtype):
        w = decode_bytes(packed, byte_lut("int4", packed.device)).mul_(_row_scale(extras["weight_scale"], packed))
        return unrotate(w, self.convrot).to(dtype)

    def parts(self, packed, extras):
        return {"int4x2": packed, "scale": extras["weight_scale"], "convrot": self.convrot}
