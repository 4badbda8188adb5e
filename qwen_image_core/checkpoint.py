"""Reading weights: memory-mapped safetensors files and sharded diffusers folders.

Nothing here knows a model; `formats/` does. Tensors come back as zero-copy views of a private
(copy-on-write) memory map, so a model built on the meta device and filled by assignment never holds a
second copy of the weights. Only safetensors is read: pickle-based files are refused.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype tags -> torch dtypes
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
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


class CheckpointError(ValueError):
    """A file or folder that cannot be used; the message names it and says what was expected."""


@dataclass(frozen=True)
class _Entry:
    file: SafetensorsFile
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """The header of one .safetensors file plus a lazily created memory map of its bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{self.path}: not a safetensors file, or a truncated one (bad header length)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, _Entry] = {}
        data_end = 0
        for name, info in header.items():
            if info["dtype"] not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            self.entries[name] = _Entry(self, DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + begin, 8 + n + end)
            data_end = max(data_end, 8 + n + end)
        if data_end > size:
            raise CheckpointError(
                f"{self.path}: file is truncated ({size} bytes, the header describes {data_end}); download it again"
            )
        self._map: mmap.mmap | None = None

    def tensor(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        if e.end == e.begin:
            return torch.empty(e.shape, dtype=e.dtype)
        if self._map is None:
            with open(self.path, "rb") as f:  # private mapping: writable views, file never modified
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        itemsize = torch.empty((), dtype=e.dtype).element_size()
        flat = torch.frombuffer(self._map, dtype=e.dtype, count=(e.end - e.begin) // itemsize, offset=e.begin)
        return flat.view(e.shape)


class Checkpoint(Mapping[str, torch.Tensor]):
    """One logical state dict over a single file or the shards of a folder; tensors are read on access."""

    def __init__(self, path: Path, entries: dict[str, _Entry], metadata: dict[str, str]):
        self.path = path
        self.entries = entries
        self.metadata = metadata

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.entries[key].file.tensor(key)

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


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a .safetensors file, or a folder holding one file or index-resolved shards."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle-based checkpoints ({path.suffix}) can run code when loaded and are refused; "
            "use the .safetensors version of this model"
        )
    if path.is_file():
        f = SafetensorsFile(path)
        return Checkpoint(path, dict(f.entries), f.metadata)
    for name in INDEX_NAMES:
        if (path / name).is_file():
            return _open_sharded(path, path / name)
    for name in SINGLE_NAMES:
        if (path / name).is_file():
            return open_checkpoint(path / name)
    raise CheckpointError(f"{path}: folder holds no {' / '.join(INDEX_NAMES + SINGLE_NAMES)}")


def _open_sharded(folder: Path, index: Path) -> Checkpoint:
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
    files = {name: SafetensorsFile(folder / name) for name in sorted(set(weight_map.values()))}
    entries, metadata = {}, {}
    for key, shard in weight_map.items():
        if key not in files[shard].entries:
            raise CheckpointError(f"{index}: lists {key!r} in {shard}, which does not contain it")
        entries[key] = files[shard].entries[key]
    for f in files.values():
        metadata.update(f.metadata)
    return Checkpoint(folder, entries, metadata)
