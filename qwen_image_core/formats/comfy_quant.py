"""ComfyUI's quantised layers, as data: the per-layer `comfy_quant` marker and the tensors of each format.

A quantised layer `<layer>` carries `<layer>.comfy_quant`, a uint8 tensor holding UTF-8 JSON: `format` (a key
of FORMATS), optional `full_precision_matrix_mult`, and format flags (`convrot`, `convrot_groupsize`,
`group_size`, `linear_dtype`) at the top level or under `params` (the top level wins, as in ComfyUI's
`comfy/ops.py _load_quantized_module`). Older files list their layers in the safetensors metadata
`_quantization_metadata` ({"layers": {name: {"format": ...}}}) instead; both are read the same way. Each layer
decides for itself (mixed per layer); layers without a marker are plain weights. The stored tensors of each
format are in FORMATS (names after `<layer>.`); the math is `quant_comfy`'s.

`read_markers` reads the markers (small tensors) before the weights, `logical_shapes` gives the float
shapes the packed weights stand for (for size inference), `split` turns a layer's stored tensors into
`(stored weight, Quant, {buffer: tensor})` for `common.assign_weights(packed=...)`, and `describe` names the
storage for the loader node.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .. import quant_comfy as Q
from ..checkpoint import CheckpointError

MARKER = ".comfy_quant"
HEADER = "_quantization_metadata"
PARAMS = "params"  # the section that may hold the format flags
FULL_PRECISION = "full_precision_matrix_mult"
E4M3, E5M2, E8M0 = torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu
U8, I8 = torch.uint8, torch.int8


@dataclass(frozen=True)
class Layout:
    """The tensors of one format: `weight` dtypes accepted (bytes of the later ones are viewed as the first,
    e.g. legacy uint8 fp8), required and optional tensors, raw-byte tensors viewed as a dtype, other
    spellings of tensor names, a short label for the loader node, and how many weights one stored byte of a
    row holds (asym_w4a8_int8: 0, the width follows from its group scales)."""

    weight: tuple[torch.dtype, ...]
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    views: Mapping[str, torch.dtype] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    label: str = ""
    per_byte: int = 1


FORMATS: dict[str, Layout] = {
    "float8_e4m3fn": Layout((E4M3, U8), ("weight_scale",), ("input_scale",), label="fp8 e4m3fn + scale"),
    "float8_e5m2": Layout((E5M2, U8), ("weight_scale",), ("input_scale",), label="fp8 e5m2 + scale"),
    "int8_tensorwise": Layout((I8, U8), ("weight_scale",), label="int8 + scales"),
    "nvfp4": Layout(
        (U8, I8), ("weight_scale", "weight_scale_2"), ("input_scale", "pre_quant_scale"),
        views={"weight_scale": E4M3}, label="fp4 e2m1 + fp8 block scales", per_byte=2,
    ),
    "mxfp8": Layout((E4M3, U8), ("weight_scale",), ("input_scale",), views={"weight_scale": E8M0},
                    label="fp8 + e8m0 block scales"),
    "asym_w4a8_int8": Layout(
        (I8, U8), ("weight_s_rel", "weight_s_channel"), ("weight_codebook", "weight_correction"),
        views={"weight_s_rel": E4M3}, label="int4 codes + group scales", per_byte=0,
    ),
    "awq_w4a16": Layout((I8, U8), ("weight_scale", "weight_zeros"), aliases={"weight_zero": "weight_zeros"},
                        label="uint4 + group scales and zeros", per_byte=2),
    "convrot_w4a4": Layout((I8, U8), ("weight_scale",), label="int4 + row scales, ConvRot", per_byte=2),
}  # fmt: skip
# defaults of the flags (ComfyUI's)
DEFAULTS = {"convrot_groupsize": 256, "group_size": {"asym_w4a8_int8": 16, "awq_w4a16": 64}, "linear_dtype": "int4"}
SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
ROTATABLE = ("int8_tensorwise",)  # formats whose `convrot` flag ComfyUI honours (others are refused with it)


@dataclass(frozen=True)
class Marker:
    """One layer's quantisation: its format and flags (top level over `params`)."""

    format: str
    flags: Mapping

    def flag(self, name: str, default=None):
        return self.flags.get(name, default)


def parse_marker(raw: bytes | Mapping, where: str) -> Marker:
    try:
        conf = json.loads(bytes(raw).decode("utf-8")) if not isinstance(raw, Mapping) else raw
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{where}: not a readable comfy_quant JSON ({e})") from None
    if not isinstance(conf, Mapping) or not isinstance(conf.get("format"), str):
        raise CheckpointError(f"{where}: a comfy_quant marker must be a JSON object with a string `format`")
    params = conf.get(PARAMS) if isinstance(conf.get(PARAMS), Mapping) else {}
    return Marker(conf["format"], {**params, **{k: v for k, v in conf.items() if k != PARAMS}})


def read_markers(
    path, names, get: Callable[[str], torch.Tensor], metadata: Mapping[str, str], rename: Callable[[str], str]
):
    """{layer: Marker} from `<layer>.comfy_quant` tensors among `names` (read through `get`) and the
    `_quantization_metadata` header, whose layer names are the file's (`rename` maps them to ours). Unknown
    formats are refused here, naming themselves."""
    markers: dict[str, Marker] = {}
    if HEADER in metadata:
        try:
            layers = json.loads(metadata[HEADER])["layers"]
            items = list(layers.items())
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable {HEADER} metadata ({e})") from None
        for name, spec in items:
            if not isinstance(spec, Mapping):
                raise CheckpointError(f"{path}: {HEADER} entry {name!r} is not an object")
            markers[rename(name)] = parse_marker(spec, f"{path}: {HEADER} entry {name!r}")
    for name in names:
        if name.endswith(MARKER):
            t = get(name)
            if t.numel():
                raw = t.reshape(-1).view(U8) if t.dtype in (U8, I8) else t.reshape(-1).to(U8)
                markers[name.removesuffix(MARKER)] = parse_marker(bytes(raw.tolist()), f"{path}: {name}")
    for layer, m in markers.items():
        if m.format not in FORMATS:
            raise CheckpointError(
                f"{path}: layer {layer} is stored in the comfy_quant format {m.format!r}, which this loader does "
                f"not know (it reads {', '.join(FORMATS)}); a newer ComfyUI or the tool that wrote it may read it"
            )
        if m.flag("convrot") and m.format not in ROTATABLE:
            raise CheckpointError(
                f"{path}: layer {layer} is {m.format} with `convrot: true`, which ComfyUI's loader does not read "
                "(only int8_tensorwise layers are ConvRot-rotated there)"
            )
    return markers


def logical_shapes(shapes: Mapping[str, tuple[int, ...]], markers: Mapping[str, Marker]) -> dict:
    """The shapes with each quantised weight given as the float weight it stands for (padding included)."""
    out = {k: v for k, v in shapes.items() if not k.endswith(MARKER)}
    for layer, m in markers.items():
        key = layer + ".weight"
        if key in out and len(out[key]) == 2:
            rows, cols = out[key]
            per_byte = FORMATS[m.format].per_byte if m.format in FORMATS else 1
            if per_byte:
                out[key] = (rows, cols * per_byte)
            elif len(shapes.get(layer + ".weight_s_rel", ())) == 2:
                out[key] = (rows, shapes[layer + ".weight_s_rel"][1] * _int(m, "group_size", layer))
    return out


def _int(m: Marker, name: str, layer: str) -> int:
    default = DEFAULTS[name].get(m.format) if isinstance(DEFAULTS[name], dict) else DEFAULTS[name]
    v = m.flag(name, default)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise CheckpointError(f"layer {layer}: comfy_quant `{name}` is {v!r}, expected a positive integer")
    return v


def split(path, tensors: dict[str, torch.Tensor], markers: Mapping[str, Marker]):
    """Take every marked layer's tensors out of `tensors` (and every marker): returns (the rest, packed) with
    packed = {"<layer>.weight": (stored weight, Quant, {buffer: tensor})}."""
    rest = {k: v for k, v in tensors.items() if not k.endswith(MARKER)}
    packed = {}
    for layer, m in markers.items():
        if layer + ".weight" not in rest:
            raise CheckpointError(f"{path}: the file marks layer {layer} as {m.format}, but it has no {layer}.weight")
        layout = FORMATS[m.format]
        for other, ours in layout.aliases.items():
            if layer + "." + other in rest and layer + "." + ours not in rest:
                rest[layer + "." + ours] = rest.pop(layer + "." + other)
        weight = rest.pop(layer + ".weight")
        if weight.dtype not in layout.weight:
            allowed = " or ".join(str(d).removeprefix("torch.") for d in layout.weight)
            raise CheckpointError(
                f"{path}: layer {layer} is declared {m.format} but its weight is stored as {weight.dtype} "
                f"(expected {allowed})"
            )
        if weight.dtype != layout.weight[0]:
            weight = weight.view(layout.weight[0])
        missing = [n for n in layout.required if layer + "." + n not in rest]
        if missing:
            raise CheckpointError(
                f"{path}: {m.format} layer {layer} lacks {', '.join(layer + '.' + n for n in missing)}"
            )
        extras = {}
        for n in (*layout.required, *layout.optional):
            t = rest.pop(layer + "." + n, None)
            if t is not None:
                view = layout.views.get(n)
                extras[n] = t.view(view) if view is not None and t.dtype in (U8, I8) else t
        try:
            quant = BUILD[m.format](m, tuple(weight.shape), extras, layer)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: {m.format} layer {layer}: {e}") from None
        packed[layer + ".weight"] = (weight, quant, extras)
    return rest, packed


# -- per format: checks of the stored tensors, and the Quant ------------------------------------------------


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _common(m: Marker, extras) -> dict:
    return {"extras": tuple(extras), "full_precision": bool(m.flag(FULL_PRECISION, False))}


def _shape(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else list(t.shape)


def _float8(m, shape, extras, layer):
    _need(len(shape) == 2, f"weight of shape {list(shape)} is not a matrix")
    for n in ("weight_scale", "input_scale"):
        _need(n not in extras or extras[n].numel() == 1, f"{n} of shape {_shape(extras.get(n))} is not one number")
    fp8 = E4M3 if m.format == "float8_e4m3fn" else E5M2
    return Q.Float8(shape, fp8=fp8, **_common(m, extras))


def _int8(m, shape, extras, layer):
    _need(len(shape) == 2, f"weight of shape {list(shape)} is not a matrix")
    s = extras["weight_scale"]
    _need(s.numel() in (1, shape[0]) and s.ndim <= 2, f"weight_scale of shape {_shape(s)} is neither one number "
          f"nor one per row ({shape[0]})")  # fmt: skip
    group = _int(m, "convrot_groupsize", layer) if m.flag("convrot", False) else 0
    _need(group == 0 or shape[1] % group == 0, f"{shape[1]} input channels do not split into ConvRot groups of {group}")
    return Q.Int8(shape, convrot=group, **_common(m, extras))


def _padded(m, shape, extras, pad, per_byte, block, scale_name):
    rows, k = shape[0], shape[1] * per_byte
    _need(rows % pad == 0 and k % pad == 0, f"stored weight {list(shape)} is not padded to multiples of {pad}")
    bs = extras[scale_name]
    tiles = -(-rows // 128) * 128 * -(-(k // block) // 4) * 4
    _need(bs.numel() == tiles, f"{scale_name} holds {bs.numel()} block scales; {rows} x {k} needs {tiles} (swizzled)")
    return rows, k


def _nvfp4(m, shape, extras, layer):
    rows, k = _padded(m, shape, extras, 16, 2, 16, "weight_scale")
    _need(extras["weight_scale_2"].numel() == 1, "weight_scale_2 is not one number")
    pqs = extras.get("pre_quant_scale")
    _need(pqs is None or k - 16 < pqs.numel() <= k, f"pre_quant_scale of {_shape(pqs)} does not fit {k} inputs")
    width = pqs.numel() if pqs is not None else k
    return Q.NVFP4((rows, width), **_common(m, extras))


def _mxfp8(m, shape, extras, layer):
    rows, k = _padded(m, shape, extras, 32, 1, 32, "weight_scale")
    return Q.MXFP8((rows, k), **_common(m, extras))


def _w4a8(m, shape, extras, layer):
    group, rot = _int(m, "group_size", layer), _int(m, "convrot_groupsize", layer)
    s_rel, s_ch = extras["weight_s_rel"], extras["weight_s_channel"]
    _need(s_rel.ndim == 2 and s_rel.shape[0] == shape[0], f"weight_s_rel of shape {_shape(s_rel)} is not [out, groups]")
    k = s_rel.shape[1] * group
    _need(shape[1] * 2 == k or shape[1] * 8 == k * 6, f"packed rows of {shape[1]} bytes hold neither 4- nor 6-bit "
          f"codes of {k} inputs")  # fmt: skip
    _need(k % rot == 0, f"{k} input channels do not split into ConvRot groups of {rot}")
    _need(s_ch.numel() == shape[0], f"weight_s_channel of shape {_shape(s_ch)} is not one per row")
    book, corr = extras.get("weight_codebook"), extras.get("weight_correction")
    _need(book is None or book.numel() == 16, "weight_codebook does not hold 16 levels")
    _need(book is None or shape[1] * 2 == k, "6-bit codes have no codebook")
    _need(
        corr is None or _shape(corr) == [k // group, shape[0]],
        f"weight_correction of {_shape(corr)} is not [groups, out]",
    )
    return Q.W4A8((shape[0], k), group=group, convrot=rot, **_common(m, extras))


def _awq(m, shape, extras, layer):
    group, k = _int(m, "group_size", layer), shape[1] * 2
    want = [k // group, shape[0]]
    _need(k % group == 0, f"{k} input channels do not split into groups of {group}")
    for n in ("weight_scale", "weight_zeros"):
        _need(_shape(extras[n]) == want, f"{n} of shape {_shape(extras[n])} is not [in / group, out] = {want}")
    return Q.AWQ((shape[0], k), group=group, **_common(m, extras))


def _w4a4(m, shape, extras, layer):
    rot, k = _int(m, "convrot_groupsize", layer), shape[1] * 2
    _need(k % rot == 0, f"{k} input channels do not split into ConvRot groups of {rot}")
    _need(
        extras["weight_scale"].numel() == shape[0],
        f"weight_scale of {_shape(extras['weight_scale'])} is not one per row",
    )
    dtype = m.flag("linear_dtype", DEFAULTS["linear_dtype"])
    _need(dtype in ("int4", "int8"), f"linear_dtype {dtype!r} is neither int4 nor int8")
    return Q.ConvRotW4A4((shape[0], k), convrot=rot, linear_dtype=dtype, **_common(m, extras))


BUILD = {
    "float8_e4m3fn": _float8, "float8_e5m2": _float8, "int8_tensorwise": _int8, "nvfp4": _nvfp4, "mxfp8": _mxfp8,
    "asym_w4a8_int8": _w4a8, "awq_w4a16": _awq, "convrot_w4a4": _w4a4,
}  # fmt: skip


def label(quant) -> str:
    """A short name of a layer's format for the loader node, e.g. 'int8_convrot (int8 + per-row scales)'."""
    if isinstance(quant, Q.Int8):  # ConvRot weights are always quantised per row
        return "int8_convrot (int8 + per-row scales)" if quant.convrot else "int8_tensorwise (int8 + scales)"
    return f"{quant.name} ({FORMATS[quant.name].label})" if quant.name in FORMATS else quant.name


def describe(packed: Mapping, rest: Mapping[str, torch.Tensor]) -> str:
    """'<format label> in N layers' for each format by bytes, then the dtype of the other weights."""
    by = Counter()
    count = Counter()
    for data, quant, extras in packed.values():
        name = label(quant)
        by[name] += data.numel() * data.element_size() + sum(t.numel() * t.element_size() for t in extras.values())
        count[name] += 1
    plain = Counter()
    for t in rest.values():
        if t.is_floating_point() and t.ndim >= 2:
            plain[SHORT.get(t.dtype, str(t.dtype).removeprefix("torch."))] += t.numel() * t.element_size()
    parts = [f"{name}: {count[name]} layers" for name, _ in by.most_common()]
    if plain:
        parts.append("the rest " + "/".join(d for d, _ in plain.most_common()))
    return ", ".join(parts)
