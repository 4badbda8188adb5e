"""The one safetensors reader: every structural defect of a header is a CheckpointError naming the file, the tensor
and the defect; tensors are read into process memory (a loaded model survives its file being cut or replaced) or,
on request, mapped; a file that changes while it is read is refused; shard indexes are checked."""

from __future__ import annotations

import json
import os
import struct
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen_image_core.checkpoint import CheckpointError, SafetensorsFile, open_checkpoint

F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}  # one valid entry over 8 bytes of data


def raw_file(path, header, data: bytes = bytes(8)):
    """A .safetensors file with exactly this header (a JSON-able value, or raw bytes) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def refused(tmp_path, header, *fragments, data: bytes = bytes(8), name="bad.safetensors") -> str:
    path = raw_file(tmp_path / name, header, data)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg}"
    return msg


# -- header defects, each class with several cases
@pytest.mark.parametrize(
    "header, kind",
    [([], "a list"), ([F32], "a list"), (3, "the number 3"), ("hello", "the string 'hello'"), (None, "null")],
)
def test_header_not_an_object(tmp_path, header, kind):
    refused(tmp_path, header, "corrupt safetensors header", f"the header is {kind}, not an object of tensors")


@pytest.mark.parametrize("entry, kind", [([0, 8], "a list"), ("F32", "the string 'F32'"), (5, "the number 5")])
def test_entry_not_an_object(tmp_path, entry, kind):
    refused(tmp_path, {"w": entry}, "tensor 'w' is " + kind, "expected an object with dtype, shape, data_offsets")


@pytest.mark.parametrize("drop", [("data_offsets",), ("dtype",), ("shape",), ("dtype", "shape", "data_offsets")])
def test_missing_fields(tmp_path, drop):
    entry = {k: v for k, v in F32.items() if k not in drop}
    refused(tmp_path, {"ok": F32, "w": entry}, "tensor 'w' has no " + " / ".join(drop))


@pytest.mark.parametrize(
    "dtype, fragment",
    [
        (5, "dtype is the number 5, expected a string"),
        (None, "dtype is null"),
        (["F32"], "dtype is a list"),
        ("F4", "unsupported dtype 'F4'"),
        ("float32", "unsupported dtype 'float32'"),
    ],
)
def test_ill_typed_or_unknown_dtype(tmp_path, dtype, fragment):
    refused(tmp_path, {"w": {**F32, "dtype": dtype}}, "tensor 'w'", fragment)


@pytest.mark.parametrize("shape", ["2", [2, -1], [2.0], [True, 2], None, {"0": 2}, [[2]]])
def test_bad_shape(tmp_path, shape):
    refused(
        tmp_path, {"w": {**F32, "shape": shape}}, "tensor 'w': shape is", "expected a list of non-negative integers"
    )


@pytest.mark.parametrize("offsets", [[0], [0, 4, 8], [-1, 7], [0, 8.0], "0-8", [True, 8], None, [[0], [8]]])
def test_offsets_not_two_non_negative_ints(tmp_path, offsets):
    refused(tmp_path, {"w": {**F32, "data_offsets": offsets}}, "tensor 'w': data_offsets is", "two non-negative")


@pytest.mark.parametrize("offsets", [[8, 0], [16, 8]])
def test_reversed_offsets(tmp_path, offsets):
    refused(tmp_path, {"w": {**F32, "data_offsets": offsets}}, f"tensor 'w': data_offsets {offsets}", "reversed")


@pytest.mark.parametrize(
    "header, data, needed",
    [
        ({"w": {**F32, "data_offsets": [8, 16]}}, bytes(8), 16),  # one tensor past the end
        ({"a": F32, "b": {**F32, "data_offsets": [8, 16]}}, bytes(12), 16),  # cut inside the second
        ({"a": {"dtype": "U8", "shape": [1000], "data_offsets": [0, 1000]}}, bytes(8), 1000),
    ],
)
def test_offsets_beyond_the_data_are_a_truncated_file(tmp_path, header, data, needed):
    last = max(header, key=lambda k: header[k]["data_offsets"][1])
    refused(
        tmp_path, header, "file is truncated", f"describes {needed}", f"tensor {last!r}", "download it again", data=data
    )


@pytest.mark.parametrize(
    "entry, held, needs",
    [
        ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}, 20, "F32 [2, 3] needs 24"),
        ({"dtype": "BF16", "shape": [4], "data_offsets": [0, 4]}, 4, "BF16 [4] needs 8"),
        ({"dtype": "F64", "shape": [], "data_offsets": [0, 4]}, 4, "F64 [] needs 8"),
        ({"dtype": "U8", "shape": [0, 5], "data_offsets": [0, 1]}, 1, "U8 [0, 5] needs 0"),
    ],
)
def test_byte_count_differs_from_dtype_times_shape(tmp_path, entry, held, needs):
    refused(tmp_path, {"w": entry}, "tensor 'w'", f"hold {held} bytes", needs, data=bytes(32))


@pytest.mark.parametrize(
    "a, b",
    [([0, 16], [8, 24]), ([0, 8], [0, 8]), ([0, 32], [8, 16]), ([8, 16], [0, 16])],
    ids=["partial", "identical", "contained", "reverse-order"],
)
def test_overlapping_tensors(tmp_path, a, b):
    header = {
        "a": {"dtype": "U8", "shape": [a[1] - a[0]], "data_offsets": a},
        "b": {"dtype": "U8", "shape": [b[1] - b[0]], "data_offsets": b},
    }
    msg = refused(tmp_path, header, "overlap", data=bytes(32))
    assert "'a'" in msg and "'b'" in msg
    with pytest.raises(Exception):  # noqa: B017 (the safetensors library refuses such files too, in its own words)
        safe_open(str(tmp_path / "bad.safetensors"), "pt")


@pytest.mark.parametrize(
    "metadata, fragment",
    [
        ([], "__metadata__ is a list, expected an object of string -> string"),
        ("format=pt", "__metadata__ is the string"),
        (7, "__metadata__ is the number 7"),
        ({"format": 1}, "__metadata__ entry 'format' is the number 1, expected a string"),
        ({"a": None}, "__metadata__ entry 'a' is null"),
        ({"a": {"b": "c"}}, "__metadata__ entry 'a' is an object"),
    ],
)
def test_metadata_not_an_object_of_strings(tmp_path, metadata, fragment):
    refused(tmp_path, {"__metadata__": metadata, "w": F32}, fragment)


@pytest.mark.parametrize(
    "raw, fragments",
    [
        (b"{not json!}", ("not valid JSON",)),
        (b'{"w": ' + json.dumps(F32).encode() + b', "w": ' + json.dumps(F32).encode() + b"}", ("'w' appears twice",)),
        (b'{"w": "\xff\xfe"}', ("not valid JSON",)),
        (b"", ("not valid JSON",)),
    ],
    ids=["syntax", "duplicate-tensor", "not-utf8", "empty"],
)
def test_header_not_json(tmp_path, raw, fragments):
    refused(tmp_path, raw, "corrupt safetensors header", *fragments)


def test_header_length_field(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="not a safetensors file \\(only 2 bytes\\)"):
        open_checkpoint(tmp_path / "short.safetensors")
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CheckpointError, match="bad header length: 1000000 bytes announced, 2 present"):
        open_checkpoint(tmp_path / "long.safetensors")
    huge = tmp_path / "huge.safetensors"
    with open(huge, "wb") as f:
        f.write(struct.pack("<Q", 200_000_000))
        f.truncate(200_000_100)  # sparse: no disk used
    with pytest.raises(CheckpointError, match="more than the 100000000 allowed"):
        open_checkpoint(huge)


def test_every_loader_reports_a_header_defect(tmp_path):
    from qwen_image_core.formats.vae import load_vae
    from qwen_image_core.lora import load_lora
    from qwen_image_core.mmdit import MMDiT, MMDiTConfig, load_dit
    from qwen_image_core.text_encoder import load_text_encoder

    path = raw_file(tmp_path / "x.safetensors", {"w": {"dtype": "F32", "shape": [2]}})
    with torch.device("meta"):
        dit = MMDiT(MMDiTConfig(num_layers=1))
    for load in (load_dit, load_vae, lambda p: load_text_encoder(p, tokenizer=object()), lambda p: load_lora(p, dit)):
        with pytest.raises(
            CheckpointError, match=f"^{path}: corrupt safetensors header: tensor 'w' has no data_offsets"
        ):
            load(path)


# -- good files, both ways of holding them
def good_file(path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b": torch.randn(7, generator=g),
        "c": torch.randn(2, 2, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 4),
        "flag": torch.tensor([True, False]),
    }
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    return tensors


@pytest.mark.parametrize("mmap", [False, True], ids=["copied", "mmap"])
def test_good_file_reads_like_the_safetensors_library(tmp_path, mmap):
    expected = good_file(tmp_path / "good.safetensors")
    ckpt = open_checkpoint(tmp_path / "good.safetensors", mmap=mmap)
    assert ckpt.metadata == {"format": "pt", "note": "x"} and set(ckpt) == set(expected)
    for k, v in expected.items():
        assert ckpt[k].dtype == v.dtype and ckpt[k].shape == v.shape and ckpt.shape(k) == tuple(v.shape)
        assert torch.equal(ckpt[k].view(torch.uint8), v.view(torch.uint8)), k
    assert ckpt.nbytes() == sum(v.numel() * v.element_size() for v in expected.values())


def test_copied_tensors_outlive_their_file(tmp_path):
    """Copied (default): truncating, overwriting or deleting the file after the read changes nothing in memory."""
    path = tmp_path / "good.safetensors"
    expected = good_file(path)
    ckpt = open_checkpoint(path)
    held = {k: ckpt[k] for k in ckpt}
    with open(path, "r+b") as f:
        f.truncate(100)  # in place: a mapping of the file would now SIGBUS on access
    for k, v in expected.items():
        assert torch.equal(held[k].view(torch.uint8), v.view(torch.uint8))
    os.remove(path)
    assert float(held["b"].sum()) == float(expected["b"].sum())


@pytest.mark.parametrize("change", ["truncate", "overwrite", "rename", "delete"])
def test_a_file_that_changes_while_it_is_read_is_refused(tmp_path, change):
    path = tmp_path / "good.safetensors"
    good_file(path)
    f = SafetensorsFile(path)  # header read; no tensor yet
    if change == "truncate":
        with open(path, "r+b") as h:
            h.truncate(os.path.getsize(path) - 3)
    elif change == "overwrite":  # same size, in place, new bytes, the old mtime put back (ctime still changes)
        time.sleep(0.05)  # file timestamps advance by clock ticks of a few ms
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        st = path.stat()
        with open(path, "r+b") as h:
            h.write(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "rename":
        good_file(tmp_path / "other.safetensors")
        os.replace(tmp_path / "other.safetensors", path)
    else:
        os.remove(path)
    expected = "disappeared" if change == "delete" else "changed on disk while it was being loaded"
    with pytest.raises(CheckpointError, match=expected):
        f.tensor("a")


def test_short_read_is_a_truncated_file(tmp_path, monkeypatch):
    """A read that ends early (the file was cut between the identity check and the read) is an error, not zeros."""
    path = tmp_path / "good.safetensors"
    good_file(path)
    f = SafetensorsFile(path)
    e = f.entries["b"]
    monkeypatch.setattr(f, "entries", {"b": type(e)(f, e.dtype, (7 + 1000,), e.begin, e.end + 4000)})
    with pytest.raises(CheckpointError, match="file is truncated: it ended at byte .* while reading tensor 'b'"):
        f.tensor("b")


# -- shard indexes
def shards(tmp_path, index) -> object:
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file({"a": torch.zeros(2)}, str(folder / "s1.safetensors"))
    raw = index if isinstance(index, str) else json.dumps(index)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(raw)
    return folder


@pytest.mark.parametrize(
    "index, fragment",
    [
        ("[1, 2", "not a valid shard index"),
        ([], "not a valid shard index (expected an object with a 'weight_map'"),
        ({"weight_map": ["s1.safetensors"]}, "expected an object with a 'weight_map'"),
        ({"weight_map": {"a": 3}}, "expected an object with a 'weight_map'"),
        ({"weight_map": {"a": "../s1.safetensors"}}, "shard '../s1.safetensors' is not a file name inside"),
        ({"weight_map": {"a": "/etc/passwd"}}, "is not a file name inside"),
        ({"weight_map": {"a": "s2.safetensors"}}, "lists shard s2.safetensors, which is missing"),
        ({"weight_map": {"b": "s1.safetensors"}}, "lists 'b' in s1.safetensors, which does not contain it"),
    ],
)
def test_bad_shard_index(tmp_path, index, fragment):
    folder = shards(tmp_path, index)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    assert fragment in str(e.value) and str(folder) in str(e.value)


def test_a_bad_shard_names_the_shard(tmp_path):
    folder = shards(tmp_path, {"weight_map": {"a": "s1.safetensors", "w": "s2.safetensors"}})
    raw_file(folder / "s2.safetensors", {"w": {**F32, "data_offsets": [8, 0]}})
    with pytest.raises(CheckpointError, match=f"{folder / 's2.safetensors'}: corrupt .* tensor 'w'.* reversed"):
        open_checkpoint(folder)
