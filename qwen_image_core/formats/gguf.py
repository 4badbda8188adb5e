"""GGUF files (ggml / llama.cpp's container; the format of city96's and QuantStack's Qwen-Image GGUFs), read
without the `gguf` package: its header is small and simple, and parsing it here lets every defect be named.

Layout (GGUF v2 / v3, little-endian): "GGUF", uint32 version, uint64 tensor count, uint64 key/value count; the
typed key/value pairs (metadata); one info per tensor (name, dims innermost first, ggml type, offset into the
data); padding to `general.alignment` (32 unless set); the tensor data. Everything is checked before a tensor is
read, each defect a CheckpointError naming the file and the tensor or key: bad magic, an unsupported version or
a big-endian file, counts or strings or arrays running past the end of the file, unknown value types, duplicate
keys or tensors, more than 4 dims, rows that do not split into whole blocks, misaligned offsets, tensors past the
end of the file (truncated) or overlapping.

Conventions (as ComfyUI-GGUF reads them): a tensor's torch shape is its dims reversed, or the
`comfy.gguf.orig_shape.<name>` array where a converter stored it reshaped; `general.architecture` names the
model ("qwen_image"; absent in files from stable-diffusion.cpp). Tensor bytes are read like safetensors' (into
process memory, or mapped with `mmap=True`; the file's identity checked at every read).
"""

from __future__ import annotations

import math
import os
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .. import quant_gguf as Q
from ..checkpoint import CheckpointError, TensorFile, _Entry, check_spans

MAGIC, VERSIONS, SUFFIX = b"GGUF", (2, 3), ".gguf"
ARCH_KEY, ALIGNMENT_KEY, DEFAULT_ALIGNMENT = "general.architecture", "general.alignment", 32
ORIG_SHAPE = "comfy.gguf.orig_shape."  # + tensor name: ComfyUI-GGUF's stored-reshaped marker (array of ints)
MAX_DIMS, MAX_KEY, MAX_NESTING = 4, 65535, 3  # ggml's dims; the spec's key length; arrays of arrays of arrays
# metadata value types: id -> (name, struct format) for scalars; 8 = string, 9 = array
SCALARS = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"), 4: ("uint32", "<I"),
    5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"), 10: ("uint64", "<Q"), 11: ("int64", "<q"),
    12: ("float64", "<d"),
}  # fmt: skip
STRING, ARRAY = 8, 9
# `general.architecture` of other models in GGUF, for messages
ARCHITECTURES = {
    "flux": "a Flux diffusion model", "sd1": "a Stable Diffusion 1.x UNet", "sdxl": "an SDXL UNet",
    "sd3": "an SD3 / SD3.5 MMDiT", "aura": "an AuraFlow model", "hidream": "a HiDream model",
    "cosmos": "a Cosmos model", "ltxv": "an LTX-Video model", "hyvid": "a HunyuanVideo model",
    "wan": "a Wan video model", "lumina2": "a Lumina 2 model", "qwen2vl": "a Qwen2-VL / Qwen2.5-VL language model",
    "qwen3vl": "a Qwen3-VL language model", "llama": "a Llama language model", "t5": "a T5 text encoder",
    "t5encoder": "a T5 text encoder", "clip": "a CLIP model",
}  # fmt: skip


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether a path names a GGUF file (by its extension, as ComfyUI-GGUF lists them)."""
    return Path(path).suffix.lower() == SUFFIX and Path(path).is_file()


class _Header:
    """Reads the header of an open file, each read checked against the file's size."""

    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path, self.pos = f, size, path, 0

    def bad(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: corrupt GGUF header: {what}; the file is damaged or not a GGUF file")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise CheckpointError(
                f"{self.path}: file is truncated or its GGUF header is corrupt: {what} needs {n} bytes at byte "
                f"{self.pos}, the file has {self.size}; download it again"
            )

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        raw = self.f.read(n)
        if len(raw) != n:
            raise CheckpointError(f"{self.path}: the file changed while its header was read ({what})")
        self.pos += n
        return raw

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.scalar("<Q", what)
        if limit is not None and n > limit:
            raise self.bad(f"{what} is {n} bytes long (at most {limit})")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad(f"{what} is not UTF-8 text") from None

    def value(self, kind: int, what: str, depth: int = 0):
        if kind in SCALARS:
            return self.scalar(SCALARS[kind][1], what)
        if kind == STRING:
            return self.string(what)
        if kind != ARRAY:
            raise self.bad(f"{what} has unknown value type {kind}")
        if depth >= MAX_NESTING:
            raise self.bad(f"{what} nests arrays deeper than {MAX_NESTING}")
        inner, n = self.scalar("<I", what), self.scalar("<Q", what)
        if inner in SCALARS:  # numbers in one read
            fmt = SCALARS[inner][1]
            raw = self.take(n * struct.calcsize(fmt), f"{what} ({n} values)")
            return list(struct.unpack(f"<{n}{fmt[1]}", raw))
        self.need(n * 8, f"{what} ({n} values)")  # every string or array takes at least 8 bytes
        return [self.value(inner, f"{what}[{i}]", depth + 1) for i in range(n)]


class GGUFFile(TensorFile):
    """The validated header of one .gguf file. `metadata`: key -> value; `types`: tensor -> ggml type name;
    `shape(name)`: its torch shape. Tensors read as stored (`tensor(name)`): F32 / F16 / BF16 in their dtype and
    shape, quantised types as uint8 [rows, bytes per row] (rows = the torch shape without its last dim)."""

    def __init__(self, path: str | os.PathLike, mmap: bool = False):
        super().__init__(path, mmap)
        with self._open() as f:
            h = _Header(f, self.size, self.path)
            self.metadata, infos = self._parse(h)
        self.types: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.entries = self._layout(infos, h.pos, self.size)

    def _parse(self, h: _Header) -> tuple[dict, list]:
        if h.size < 4 or h.take(4, "magic") != MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (it does not start with 'GGUF')")
        version = h.scalar("<I", "version")
        if version not in VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in VERSIONS:
                raise CheckpointError(f"{self.path}: a big-endian GGUF file; only little-endian files are supported")
            raise CheckpointError(
                f"{self.path}: GGUF version {version} is not supported (versions {', '.join(map(str, VERSIONS))}); "
                "convert the model again with a current tool"
            )
        n_tensors, n_kv = h.scalar("<Q", "tensor count"), h.scalar("<Q", "metadata count")
        for n, what, least in ((n_kv, "metadata entries", 13), (n_tensors, "tensors", 24)):
            h.need(n * least, f"{n} {what}")  # the smallest entry of each
        metadata = {}
        for i in range(n_kv):
            key = h.string(f"metadata key {i}", MAX_KEY)
            kind = h.scalar("<I", f"metadata {key!r}")
            if key in metadata:
                raise h.bad(f"metadata key {key!r} appears twice")
            metadata[key] = h.value(kind, f"metadata {key!r}")
        infos, seen = [], set()
        for i in range(n_tensors):
            name = h.string(f"tensor name {i}", MAX_KEY)
            where = f"tensor {name!r}"
            if name in seen:
                raise h.bad(f"{where} appears twice")
            seen.add(name)
            n_dims = h.scalar("<I", where)
            if not 1 <= n_dims <= MAX_DIMS:
                raise h.bad(f"{where} has {n_dims} dims (ggml tensors have 1 to {MAX_DIMS})")
            dims = [h.scalar("<Q", where) for _ in range(n_dims)]
            infos.append((name, dims, h.scalar("<I", where), h.scalar("<Q", where)))
        return metadata, infos

    def _layout(self, infos: list, header_end: int, size: int) -> dict[str, _Entry]:
        alignment = self.metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
        if not (isinstance(alignment, int) and alignment > 0 and alignment & (alignment - 1) == 0):
            raise CheckpointError(
                f"{self.path}: corrupt GGUF header: {ALIGNMENT_KEY} is {alignment!r}, not a power of 2"
            )
        data = -(-header_end // alignment) * alignment
        entries, spans = {}, []
        for name, dims, type_id, offset in infos:
            where = f"{self.path}: tensor {name!r}"
            t = Q.BY_ID.get(type_id)
            type_name, block, nbytes = (t.name, t.block, t.nbytes) if t else Q.OTHER_TYPES.get(type_id, (None, 0, 0))
            if type_name is None:
                raise CheckpointError(f"{where} has unknown ggml type {type_id}; the file is damaged or too new")
            if dims[0] % block:
                raise CheckpointError(
                    f"{where}: rows of {dims[0]} values do not split into {type_name} blocks of {block}"
                )
            if offset % alignment:
                raise CheckpointError(f"{where}: data offset {offset} is not a multiple of the alignment {alignment}")
            numel = math.prod(dims)
            begin, length = data + offset, numel // block * nbytes
            shape = self._torch_shape(name, dims, numel)
            self.types[name], self._shapes[name] = type_name, shape
            if t is not None and t.plain is not None:
                entries[name] = _Entry(self, t.plain, shape, begin, begin + length)
            else:
                rows = numel // dims[0] if dims[0] else 0
                stored = (rows, dims[0] // block * nbytes) if t is not None else (length,)
                entries[name] = _Entry(self, torch.uint8, stored, begin, begin + length)
            spans.append((begin, begin + length, name))
        check_spans(self.path, spans, size, f"{size} bytes", lambda what: CheckpointError(
            f"{self.path}: corrupt GGUF header: {what}"))  # fmt: skip
        return entries

    def _torch_shape(self, name: str, dims: list[int], numel: int) -> tuple[int, ...]:
        orig = self.metadata.get(ORIG_SHAPE + name)
        if orig is None:
            return tuple(reversed(dims))
        ok = isinstance(orig, list) and orig and all(isinstance(d, int) and d >= 0 for d in orig)
        if not ok or math.prod(orig) != numel:
            raise CheckpointError(
                f"{self.path}: tensor {name!r}: {ORIG_SHAPE}{name} is {orig!r}, which is not a shape of its {numel} "
                "values"
            )
        return tuple(orig)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    @property
    def architecture(self):
        return self.metadata.get(ARCH_KEY)


def load_weights(
    file: GGUFFile, names: Mapping[str, str], packable: Callable[[str, tuple[int, ...]], bool]
) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """The tensors of `names` ({model name: name in the file}) as the model takes them: F32 / F16 / BF16 as plain
    tensors; quantised ones kept packed where `packable(model name, shape)` (a linear layer's weight: stored bytes,
    `quant_gguf.GGUFQuant`, no extra buffers), dequantised to float32 at load otherwise (small tensors).
    Returns (tensors, packed) for `formats.common.assign_weights`."""
    tensors, packed = {}, {}
    for name, key in names.items():
        type_name, shape = file.types[key], file.shape(key)
        t = Q.TYPES.get(type_name)
        if t is None:
            raise CheckpointError(
                f"{file.path}: tensor {key!r} is stored as {type_name}, which QwenPix does not read (supported: "
                f"{', '.join(Q.TYPES)})"
            )
        data = file.tensor(key)
        if t.plain is not None:
            tensors[name] = data
        elif packable(name, shape) and shape[-1] % t.block == 0:
            rows = math.prod(shape[:-1])  # [out, bytes per row] also where a converter stored it reshaped
            packed[name] = (data.reshape(rows, -1), Q.GGUFQuant(t, shape), {})
        else:
            tensors[name] = Q.dequantize(data, t, shape)
    return tensors, packed


def describe(file: GGUFFile, keys) -> str:
    """The storage format for plans and messages, e.g. 'GGUF Q4_K (Q4_K 420, F32 1081, F16 2)'."""
    keys = list(keys)
    counts, size = Counter(file.types[k] for k in keys), Counter()
    for k in keys:
        size[file.types[k]] += file.entries[k].end - file.entries[k].begin
    main = size.most_common(1)[0][0] if size else "empty"  # the type holding most of the bytes
    return f"GGUF {main} ({', '.join(f'{n} {c}' for n, c in counts.most_common())})"
