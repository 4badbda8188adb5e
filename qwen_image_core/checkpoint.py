"""Reading weights: validated safetensors files and sharded diffusers folders.

Nothing here knows a model; `formats/` does. Every header is checked before any tensor is read: each
structural defect (a header that is not an object of tensors, an entry without a well-typed dtype / shape /
data_offsets, offsets out of order or out of range, byte counts that disagree with dtype x shape,
overlapping tensors, metadata that is not an object of strings) is a `CheckpointError` naming the file,
the tensor and the defect. Only safetensors is read: pickle-based files are refused.

Two ways to hold the bytes (`open_checkpoint(path, mmap=...)`):
* copied (default): each tensor is read into its own process-memory buffer when it is accessed. A loaded
  model then no longer depends on the file: truncating, rewriting or deleting it later cannot change or
  crash the process. A file that changes while it is being read is detected (its identity is re-checked
  at every read, short reads are errors) and refused.
* `mmap=True`: zero-copy views of a private (copy-on-write) memory map; the kernel pages weights in on
  first touch and may drop clean pages under memory pressure, which suits headless use with little RAM.
  The price: if the file is truncated while a model is in use, touching a page past the new end raises
  SIGBUS and kills the process, and an in-place overwrite of pages not yet read swaps weights silently.
  Use it only for files nothing writes to while they are loaded.
"""

from __future__ import annotations

import json
import math
import mmap as mmap_module
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .progress import tensor_read

# safetensors dtype tags -> torch dtypes
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,  # MXFP8 block scales (ComfyUI's comfy_quant mxfp8)
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# index files of sharded folders, in the order they are tried
INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
SINGLE_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
MAX_HEADER = 100_000_000  # bytes; the safetensors library's limit
METADATA = "__metadata__"
FIELDS = ("dtype", "shape", "data_offsets")
CORRUPT = "corrupt safetensors header"
# what a file that is not safetensors starts with (checked when its first 8 bytes are no valid header length):
# (magic bytes, what it is, what to do)
OTHER_CONTAINERS = (
    (b"GGUF", "a GGUF file", "GGUF is read for the diffusion model and the text encoder, from files named *.gguf"),
    (b"PK\x03\x04", "a PyTorch (zip/pickle) checkpoint", "pickle checkpoints can run code; use a .safetensors file"),
)


class CheckpointError(ValueError):
    """A file or folder that cannot be used; the message names it and says what was expected."""


@dataclass(frozen=True)
class _Entry:
    file: TensorFile
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def _kind(value) -> str:
    """How a JSON value reads in a message: 'a list', 'the number 3', ..."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if value is None:
        return "null"
    return f"the {'boolean' if isinstance(value, bool) else 'number'} {value!r}"


def _is_count(value) -> bool:
    """A non-negative JSON integer (booleans and floats are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"{k!r} appears twice")
        out[k] = v
    return out


def parse_header(raw: bytes, path, data_size: int) -> tuple[dict[str, str], dict[str, tuple]]:
    """Validate a safetensors JSON header against `data_size` bytes of tensor data.

    Returns (metadata, {name: (dtype, shape, begin, end)}) with offsets relative to the data section.
    """

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {CORRUPT}: {what}; the file is damaged or not a safetensors file")

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError and duplicate keys are ValueErrors
        raise bad(f"not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad(f"the header is {_kind(header)}, not an object of tensors")
    metadata = header.pop(METADATA, None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise bad(f"{METADATA} is {_kind(metadata)}, expected an object of string -> string")
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise bad(f"{METADATA} entry {k!r} is {_kind(v)}, expected a string")
    entries = {name: _entry(name, info, bad) for name, info in header.items()}
    spans = [(b, e, name) for name, (_, _, b, e) in entries.items()]
    check_spans(path, spans, data_size, f"{data_size} bytes of tensor data", bad)
    return metadata, entries


def check_spans(path, spans: list[tuple[int, int, str]], size: int, size_words: str, bad) -> None:
    """Refuse tensors (begin, end, name) that reach past `size` bytes of data (a cut file) or share bytes
    (`bad(what)`: the format's corrupt-header error)."""
    past = [(end, name) for _, end, name in spans if end > size]
    if past:
        end, name = max(past)
        raise CheckpointError(
            f"{path}: file is truncated ({size_words}, the header describes {end}, up to the end of tensor "
            f"{name!r}); download it again"
        )
    ordered = sorted(s for s in spans if s[1] > s[0])
    for (b0, e0, n0), (b1, e1, n1) in zip(ordered, ordered[1:], strict=False):
        if b1 < e0:
            raise bad(f"tensors {n0!r} (bytes {b0}-{e0}) and {n1!r} (bytes {b1}-{e1}) overlap")


def _entry(name: str, info, bad) -> tuple:
    """(dtype, shape, begin, end) of one header entry, every field checked."""
    where = f"tensor {name!r}"
    if not isinstance(info, dict):
        raise bad(f"{where} is {_kind(info)}, expected an object with {', '.join(FIELDS)}")
    missing = [f for f in FIELDS if f not in info]
    if missing:
        raise bad(f"{where} has no {' / '.join(missing)}")
    tag, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(tag, str):
        raise bad(f"{where}: dtype is {_kind(tag)}, expected a string such as 'BF16'")
    if tag not in DTYPES:
        raise bad(f"{where} has unsupported dtype {tag!r} (supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"{where}: shape is {json.dumps(shape)[:60]}, expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise bad(f"{where}: data_offsets is {json.dumps(offsets)[:60]}, expected two non-negative integers")
    begin, end = offsets
    if end < begin:
        raise bad(f"{where}: data_offsets [{begin}, {end}] are reversed (end before begin)")
    dtype = DTYPES[tag]
    need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end - begin != need:
        raise bad(f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but {tag} {shape} needs {need}")
    return dtype, tuple(shape), begin, end


def file_stamp(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is rewritten, cut or replaced: any write updates ctime, even when mtime is put back."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class TensorFile:
    """A file of tensors with a validated header (`entries`: each tensor's byte span, dtype and shape); a tensor is
    read into its own buffer (or mapped, `mmap=True`) when accessed, the file's identity checked at every read.
    A format's subclass parses its header in `__init__`, from the file `_open` returns."""

    def __init__(self, path: str | os.PathLike, mmap: bool = False):
        self.path = Path(path)
        self.mmap = mmap
        self.identity: tuple[int, ...] = ()
        self.size = 0  # bytes, as the header was read
        self.entries: dict[str, _Entry] = {}
        self._map: mmap_module.mmap | None = None

    def _open(self):
        """The file opened for reading its header (the caller closes it); records its identity and size."""
        try:
            f = open(self.path, "rb")  # the stat must be of this very file
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file (was it moved or deleted?)") from None
        st = os.fstat(f.fileno())
        self.identity, self.size = file_stamp(st), st.st_size  # reads check that the file is still this one
        return f

    def _check_same(self, fd: int, name: str) -> None:
        if file_stamp(os.fstat(fd)) != self.identity:
            raise CheckpointError(
                f"{self.path}: the file changed on disk while it was being loaded (at tensor {name!r}); wait until "
                "the copy or download has finished and load it again"
            )

    def tensor(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        if e.end == e.begin:
            return torch.empty(e.shape, dtype=e.dtype)
        if self.mmap:
            return self._mapped(name, e)
        buf = torch.empty(e.end - e.begin, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        try:
            f = open(self.path, "rb", buffering=0)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: the file disappeared while it was being loaded") from None
        with f:
            self._check_same(f.fileno(), name)
            f.seek(e.begin)
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(
                        f"{self.path}: file is truncated: it ended at byte {e.begin + done} while reading tensor "
                        f"{name!r} (it was cut short while loading); download it again"
                    )
                done += got
        return buf.view(e.dtype).view(e.shape)

    def _mapped(self, name: str, e: _Entry) -> torch.Tensor:
        if self._map is None:
            with open(self.path, "rb") as f:  # private mapping: writable views, file never modified
                self._check_same(f.fileno(), name)
                self._map = mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_COPY)
        itemsize = torch.empty((), dtype=e.dtype).element_size()
        flat = torch.frombuffer(self._map, dtype=e.dtype, count=(e.end - e.begin) // itemsize, offset=e.begin)
        return flat.view(e.shape)


class SafetensorsFile(TensorFile):
    """The validated header of one .safetensors file; tensors are read (or mapped, `mmap=True`) on access."""

    def __init__(self, path: str | os.PathLike, mmap: bool = False):
        super().__init__(path, mmap)
        with self._open() as f:
            size = self.size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            for magic, what, advice in OTHER_CONTAINERS:
                if head.startswith(magic) and (n > size - 8 or n > MAX_HEADER):
                    raise CheckpointError(f"{self.path}: this is {what}, not a safetensors file; {advice}")
            if n > size - 8:
                raise CheckpointError(
                    f"{self.path}: not a safetensors file, or a truncated one (bad header length: {n} bytes "
                    f"announced, {size - 8} present); download it again"
                )
            if n > MAX_HEADER:
                raise CheckpointError(f"{self.path}: {CORRUPT}: {n} bytes long, more than the {MAX_HEADER} allowed")
            raw = f.read(n)
        self.metadata, entries = parse_header(raw, self.path, size - 8 - n)
        self.entries = {
            name: _Entry(self, dtype, shape, 8 + n + b, 8 + n + e) for name, (dtype, shape, b, e) in entries.items()
        }


class Checkpoint(Mapping[str, torch.Tensor]):
    """One logical state dict over a single file or the shards of a folder; tensors are read on access."""

    def __init__(self, path: Path, entries: dict[str, _Entry], metadata: dict[str, str]):
        self.path = path
        self.entries = entries
        self.metadata = metadata
        self._read: set[str] = set()  # names read so far, for a host's load progress (`progress.loading`)

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self.entries[key].file.tensor(key)
        fresh = key not in self._read
        self._read.add(key)
        tensor_read(len(self._read), len(self.entries), fresh)  # a host's interrupt check and progress, if loading
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key].dtype

    def nbytes(self) -> int:
        return sum(e.end - e.begin for e in self.entries.values())


def open_checkpoint(path: str | os.PathLike, mmap: bool = False) -> Checkpoint:
    """Open a .safetensors file, or a folder holding one file or index-resolved shards.

    mmap: map the files instead of copying each tensor into process memory (see the module docstring).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle-based checkpoints ({path.suffix}) can run code when loaded and are refused; "
            "use the .safetensors version of this model"
        )
    if path.is_file():
        f = SafetensorsFile(path, mmap=mmap)
        return Checkpoint(path, dict(f.entries), f.metadata)
    for name in INDEX_NAMES:
        if (path / name).is_file():
            return _open_sharded(path, path / name, mmap)
    for name in SINGLE_NAMES:
        if (path / name).is_file():
            return open_checkpoint(path / name, mmap)
    raise CheckpointError(f"{path}: folder holds no {' / '.join(INDEX_NAMES + SINGLE_NAMES)}")


def _open_sharded(folder: Path, index: Path, mmap: bool) -> Checkpoint:
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid shard index (expected an object with a 'weight_map' of names)")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index}: shard {shard!r} is not a file name inside {folder}")
        if not (folder / shard).is_file():
            raise CheckpointError(f"{index}: lists shard {shard}, which is missing from {folder}")
    files = {name: SafetensorsFile(folder / name, mmap) for name in sorted(set(weight_map.values()))}
    entries, metadata = {}, {}
    for key, shard in weight_map.items():
        if key not in files[shard].entries:
            raise CheckpointError(f"{index}: lists {key!r} in {shard}, which does not contain it")
        entries[key] = files[shard].entries[key]
    for f in files.values():
        metadata.update(f.metadata)
    return Checkpoint(folder, entries, metadata)
