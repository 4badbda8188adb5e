"""What every component format shares: prefixes, float8 scales, and strict key/shape checks."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import Checkpoint, CheckpointError
from ..ops import FP8_DTYPES, Linear, Quant, install_packed
from . import comfy_quant

# per-layer float8 scale spellings: ComfyUI's scaled_fp8 ("scale_weight") and the mixed-precision /
# diffusers spelling ("weight_scale"); W = float32(W_fp8) * scale
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
# tensors that describe quantisation of activations or carry markers; not weights of the model
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
IGNORED_KEYS = ("scaled_fp8",)


def common_prefix(keys: Iterable[str], candidates: Iterable[str]) -> str:
    """The first candidate prefix that at least half of the keys carry, else ''."""
    keys = list(keys)
    for p in candidates:
        if p and sum(k.startswith(p) for k in keys) * 2 >= len(keys):
            return p
    return ""


def positive_int(v) -> bool:
    """A config value that is a whole number above 0 (a JSON true is not 1)."""
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def checked_number(field: str, v, where, floats) -> int | float:
    """A config value: a positive number (as float) for the fields in `floats`, else a positive integer;
    a CheckpointError naming `where` and the field otherwise (a JSON true is no number)."""
    if field in floats:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise CheckpointError(f"{where}: {field} is {v!r}, expected a positive number")
        return float(v)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise CheckpointError(f"{where}: {field} is {v!r}, expected a positive integer")
    return v


def select_names(ckpt: Checkpoint, prefix: str, rename: Callable[[str], str], dropped, twice: str) -> dict[str, str]:
    """{model name: file key} of the keys under `prefix`, renamed, without those starting with `dropped`;
    a name reached from two keys is a CheckpointError naming the file (`twice` says which namings)."""
    selected: dict[str, str] = {}
    for k in ckpt.keys():
        if not k.startswith(prefix):
            continue
        name = rename(k[len(prefix) :])
        if name.startswith(dropped):
            continue
        if name in selected:
            raise CheckpointError(f"{ckpt.path}: holds {name} twice ({twice})")
        selected[name] = k
    return selected


def read_markers(ckpt: Checkpoint, names: Mapping[str, str], rename: Callable[[str], str]) -> dict:
    """The comfy_quant markers of the layers `names` ({model name: file key}) holds, under model names
    (`rename`: a file's layer name -> the model's)."""
    return comfy_quant.read_markers(ckpt.path, names, lambda n: ckpt[names[n]], ckpt.metadata, rename)


def logical_shapes(ckpt: Checkpoint, names: Mapping[str, str], markers) -> dict[str, tuple[int, ...]]:
    """Shapes under model names, packed weights given as the float weights they stand for; reads no tensor."""
    return comfy_quant.logical_shapes({n: ckpt.shape(k) for n, k in names.items()}, markers)


def read_stored(ckpt: Checkpoint, names: Mapping[str, str], markers) -> tuple[dict, dict, dict, str]:
    """`split_stored` of the tensors `names` ({model name: file key}) holds, under model names."""
    return split_stored(ckpt.path, {n: ckpt[k] for n, k in names.items()}, markers)


def read_config_json(folder: Path, parse: Callable[[object, Path], dict]) -> dict:
    """parse(contents, file) of a folder's config.json; {} when `folder` is not a folder or has none."""
    f = folder / "config.json"
    if not folder.is_dir() or not f.is_file():
        return {}
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    return parse(raw, f)


def metadata_config(metadata: Mapping[str, str], path, parse: Callable[[object, str], dict], key: str, section: str):
    """parse(section, where) of a single file's JSON metadata `key` ({section: <config.json>}); {} when the
    file has no such metadata or section."""
    if key not in metadata:
        return {}
    try:
        raw = json.loads(metadata[key])
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable `{key}` metadata ({e})") from None
    found = raw.get(section) if isinstance(raw, dict) else None
    return {} if found is None else parse(found, f"{path} (metadata {key}.{section})")


def split_scales(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate weights from float8 scales: ({name: tensor}, {"<layer>.weight": scale})."""
    weights, scales = {}, {}
    for k, t in tensors.items():
        if k in IGNORED_KEYS or k.endswith(IGNORED_SUFFIXES):
            continue
        suffix = next((s for s in SCALE_SUFFIXES if k.endswith(s)), None)
        if suffix is not None:
            scales[k[: -len(suffix)] + ".weight"] = t
        else:
            weights[k] = t
    return weights, scales


def describe_storage(tensors: Mapping[str, torch.Tensor], packed: Mapping) -> str:
    """A description of the storage format: comfy_quant layers by format, else the float8 layout or dtypes."""
    if packed:
        return comfy_quant.describe(packed, tensors)
    fp8 = {k: t.dtype for k, t in tensors.items() if t.dtype in FP8_DTYPES}
    if not fp8:
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
        return "/".join(dtypes)
    kinds = "/".join(sorted({str(d).removeprefix("torch.") for d in fp8.values()}))
    if "scaled_fp8" in tensors or any(k.endswith(".scale_weight") for k in tensors):
        return f"scaled fp8 ({kinds})"
    return f"{kinds} (no scales)"


def split_stored(path, tensors: dict[str, torch.Tensor], markers) -> tuple[dict, dict, dict, str]:
    """A file's tensors under the model's names as (float weights, float8 scales {"<layer>.weight": scale},
    packed comfy_quant layers, a description of the storage format)."""
    rest, packed = comfy_quant.split(path, tensors, markers)
    weights, scales = split_scales(rest)
    return weights, scales, packed, describe_storage(rest, packed)


def describe_mismatch(
    path, what: str, expected: Mapping[str, tuple], found: Mapping[str, tuple], limit: int = 8
) -> str | None:
    """A readable list of missing, unexpected and wrongly shaped keys, or None when they match."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return None

    def show(keys, fmt=str):
        more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(fmt(k) for k in keys[:limit]) + more

    lines = [f"{path}: does not match the {what} it was loaded as"]
    if missing:
        lines.append(f"  missing {len(missing)} keys: {show(missing)}")
    if unexpected:
        lines.append(f"  unexpected {len(unexpected)} keys: {show(unexpected)}")
    if wrong:
        lines.append("  wrong shapes: " + show(wrong, lambda k: f"{k} {list(found[k])} (expected {list(expected[k])})"))
    return "\n".join(lines)


def assign_weights(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    scales: Mapping[str, torch.Tensor],
    path,
    what: str,
    packed: Mapping[str, tuple[torch.Tensor, Quant, Mapping[str, torch.Tensor]]] | None = None,
) -> nn.Module:
    """Fill a meta-device model by assignment after checking key set and shapes; attach float8 scales.

    packed: {"<layer>.weight": (stored bytes, Quant, {extra buffer: tensor})} for weights kept in a packed
    format (`ops.set_packed`); their logical shape is checked like the others'.
    Raises CheckpointError naming the file on any mismatch, never loads partially.
    """
    packed = dict(packed or {})
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, (data, quant, extras) in list(packed.items()):  # padded formats read as the layer's own shape
        want, refit = expected.get(k), getattr(quant, "refit", None)
        fitted = refit(want) if want is not None and tuple(quant.shape) != want and refit is not None else None
        if fitted is not None:
            packed[k] = (data, fitted, extras)
    found = {k: tuple(v.shape) for k, v in tensors.items()} | {k: tuple(p[1].shape) for k, p in packed.items()}
    problem = describe_mismatch(path, what, expected, found)
    if problem:
        raise CheckpointError(problem)
    modules = dict(model.named_modules())
    for k, (data, quant, extras) in packed.items():
        owner = modules.get(k.rsplit(".", 1)[0])
        rows = hasattr(owner, "quant") and hasattr(quant, "gather")  # an embedding table that gathers rows
        if not (isinstance(owner, Linear) or rows) or not k.endswith(".weight"):
            kind = "a linear layer's or embedding's" if hasattr(quant, "gather") else "a linear layer's"
            raise CheckpointError(f"{path}: {k} is stored as {quant.name}, but it is not {kind} weight")
        try:  # an embedding's table is filled the same way; its format dequantises gathered rows only
            install_packed(owner, data, quant, extras, expected[k])
        except ValueError as e:
            raise CheckpointError(f"{path}: {k}: {e}") from None
    if packed:  # the packed layers are filled; assign the rest (their meta weights are gone from the state dict)
        model.load_state_dict({**model.state_dict(), **dict(tensors)}, strict=True, assign=True)
        _check_not_meta(model, path, what)
        _attach_scales(model, scales, path, what, modules)
        return model
    uses_scales = bool(scales)
    for k, t in tensors.items():
        if t.dtype in FP8_DTYPES and uses_scales and k not in scales:
            raise CheckpointError(f"{path}: float8 weight {k} has no scale, but the file stores per-layer scales")
    model.load_state_dict(dict(tensors), strict=True, assign=True)
    _attach_scales(model, scales, path, what, modules)
    return model


def _attach_scales(model: nn.Module, scales: Mapping[str, torch.Tensor], path, what: str, modules: dict) -> None:
    for k, s in scales.items():
        owner = modules.get(k.rsplit(".", 1)[0])
        if owner is None or not hasattr(owner, "weight_scale"):
            raise CheckpointError(f"{path}: scale for {k}, which is not a scalable layer of the {what}")
        owner.weight_scale = s.reshape(()) if s.numel() == 1 else (None if s.numel() == 0 else s)


def _check_not_meta(model: nn.Module, path, what: str) -> None:
    left = [n for n, t in model.state_dict().items() if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: the {what} was not filled completely ({', '.join(left[:4])} ...)")
