"""GGUF without the `gguf` package at runtime: the torch dequantisers (quant_gguf.py) bit for bit against gguf's own
(`gguf.quants.dequantize`, llama.cpp's reference Python code) on random blocks and on data gguf quantised, and the
header reader (formats/gguf.py) naming every structural defect of a hand-built file."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch

from qwen_image_core import quant_gguf as Q
from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.formats.gguf import GGUFFile
from tools.checkpoints import gguf as G


def random_blocks(t: Q.GGMLType, n: int, seed: int) -> np.ndarray:
    """Random bytes with finite float16 scales (normal, subnormal, zero, negative, the largest) in the half fields."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, t.nbytes), dtype=np.uint8)
    if t.plain is not None:
        values = rng.standard_normal(n).astype(np.float32) * 10.0 ** rng.integers(-6, 4, n)  # within float16
        return gguf.quants.quantize(values.reshape(n, 1), gguf.GGMLQuantizationType[t.name]).view(np.uint8)
    special = np.array([0.0, -0.0, 6e-8, -3e-5, 65504.0, -65504.0], np.float16)
    for f in Q.HALF_FIELDS:
        if f in t.fields:
            o, _ = t.fields[f]
            half = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 3, n)).astype(np.float16)
            half[: len(special)] = special
            raw[:, o : o + 2] = half.view(np.uint8).reshape(n, 2)
    return raw


def bits(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def test_the_type_table_is_ggml_s():
    for t in Q.TYPES.values():
        assert gguf.GGMLQuantizationType[t.name].value == t.id
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.name]] == (t.block, t.nbytes)
    for i, (name, block, nbytes) in Q.OTHER_TYPES.items():
        assert gguf.GGMLQuantizationType(i).name == name
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(i)] == (block, nbytes)
    assert set(Q.TYPES) == set(G.TYPES)  # every type of the published Qwen-Image GGUFs, nothing else


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("name", list(Q.TYPES))
def test_dequantisation_is_bit_equal_to_gguf_on_random_blocks(name, device):
    t = Q.TYPES[name]
    raw = random_blocks(t, 96 if device == "cpu" else 40_000, seed=t.id)  # on a GPU: more than one launch's worth
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
    packed = torch.from_numpy(raw.copy()).to(device)
    ours = Q.dequantize(packed, t, ref.shape)
    assert ours.dtype == torch.float32 and ours.device == packed.device and np.isfinite(ref).all()
    assert np.array_equal(packed.cpu().numpy(), raw)  # the stored bytes are never written
    np.testing.assert_array_equal(bits(ours.cpu().numpy()), bits(ref))


@pytest.mark.parametrize("name", [n for n, t in Q.TYPES.items() if t.plain is None])
def test_pieces_on_the_cpu_equal_one_pass(name, monkeypatch):
    """Large tensors are dequantised on the CPU in pieces into the output (here pieces of 1024 values, the last
    one short), in float32 and straight into bf16: equal to one pass and its cast."""
    t = Q.TYPES[name]
    packed = torch.from_numpy(random_blocks(t, 4100 * 32 // t.block + 3, seed=1))
    shape = (packed.shape[0] * t.block,)
    whole = Q.dequantize(packed, t, shape)
    monkeypatch.setattr(Q, "CPU_CHUNK", 1024)
    assert torch.equal(Q.dequantize(packed, t, shape), whole)
    assert torch.equal(Q.dequantize(packed, t, shape, torch.bfloat16), whole.to(torch.bfloat16))


@pytest.mark.parametrize("name", G.QUANTISABLE)
def test_dequantisation_is_bit_equal_to_gguf_on_data_gguf_quantised(name):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((48, 512)) * 10.0 ** rng.integers(-4, 2, (48, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (scale 0)
    packed = gguf.quants.quantize(x, gguf.GGMLQuantizationType[name])
    ref = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[name])
    ours = Q.dequantize(torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8)), Q.TYPES[name], x.shape)
    np.testing.assert_array_equal(bits(ours.numpy()), bits(ref))


@pytest.mark.parametrize("name", list(Q.TYPES))
def test_dequantisation_stays_on_the_tensor_s_device_in_torch(name):
    """On the meta device (no data at all): only torch ops can run there, so nothing goes through numpy or the
    host; the result has the layer's shape and the requested dtype."""
    t = Q.TYPES[name]
    cols = 4 * max(t.block, 16)
    packed = torch.empty(32, cols // t.block * t.nbytes, dtype=torch.uint8, device="meta")
    out = Q.GGUFQuant(t, (32, cols)).dequantize(packed, {}, torch.bfloat16)
    assert out.is_meta and out.shape == (32, cols) and out.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------
# The header reader, on hand-built files: every defect a CheckpointError naming the file and tensor / key
# ---------------------------------------------------------------------------------------------------------


def string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def build(kv=None, tensors=None, data_size=176, version=3, magic=b"GGUF", alignment=32, endian="<", count=None):
    """A GGUF file: kv = [(key bytes, type id, value bytes)], tensors = [(name, dims, type id, offset)]; by
    default a Q8_0 [2, 64] (4 blocks, 136 bytes) and an F32 [4] at the next aligned offset."""
    kv = [(b"general.architecture", 8, string("qwen_image"))] if kv is None else kv
    tensors = [("a.weight", [64, 2], 8, 0), ("b.weight", [4], 0, 160)] if tensors is None else tensors
    out = magic + struct.pack(endian + "IQQ", version, len(tensors) if count is None else count, len(kv))
    for key, kind, value in kv:
        out += string(key) + struct.pack("<I", kind) + value
    for name, dims, kind, offset in tensors:
        out += string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", kind, offset)
    out += b"\0" * (-len(out) % alignment)
    return out + bytes(i % 251 for i in range(data_size))


def test_a_hand_built_file_reads_as_gguf_reads_it(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(build())
    f, ref = GGUFFile(path), gguf.GGUFReader(str(path))
    assert f.architecture == "qwen_image" and f.types == {"a.weight": "Q8_0", "b.weight": "F32"}
    assert f.shape("a.weight") == (2, 64) and f.tensor("a.weight").shape == (2, 68)
    for t in ref.tensors:
        assert f.entries[t.name].begin == t.data_offset and f.entries[t.name].end - f.entries[t.name].begin == t.n_bytes
        theirs = torch.from_numpy(np.array(t.data).view(np.uint8).reshape(-1))
        assert torch.equal(f.tensor(t.name).reshape(-1).view(torch.uint8), theirs)


U32 = struct.pack("<I", 7)
DEFECTS = {
    "magic": (dict(magic=b"GGUX"), "not a GGUF file"),
    "version 1": (dict(version=1), "GGUF version 1 is not supported"),
    "big-endian": (dict(endian=">"), "big-endian"),
    "tensor count": (dict(count=1 << 40), "truncated"),
    "duplicate key": (dict(kv=[(b"k", 4, U32), (b"k", 4, U32)]), "'k' appears twice"),
    "value type": (dict(kv=[(b"k", 13, U32)]), "'k' has unknown value type 13"),
    "utf-8": (dict(kv=[(b"k", 8, string(b"\xff\xfe"))]), "'k' is not UTF-8"),
    "string past the end": (dict(kv=[(b"k", 8, struct.pack("<Q", 1 << 40))]), "truncated"),
    "array past the end": (dict(kv=[(b"k", 9, struct.pack("<IQ", 4, 1 << 40))]), "truncated"),
    "alignment": (dict(kv=[(b"general.alignment", 4, struct.pack("<I", 24))]), "not a power of 2"),
    "duplicate tensor": (dict(tensors=[("a.weight", [64, 2], 8, 0), ("a.weight", [4], 0, 160)]), "'a.weight' appears"),
    "dims": (dict(tensors=[("a.weight", [1, 1, 1, 1, 64], 0, 0)]), "'a.weight' has 5 dims"),
    "ggml type": (dict(tensors=[("a.weight", [64], 99, 0)]), "'a.weight' has unknown ggml type 99"),
    "blocks": (dict(tensors=[("a.weight", [48, 2], 2, 0)]), "'a.weight': rows of 48 values do not split into Q4_0"),
    "misaligned": (dict(tensors=[("a.weight", [64, 2], 8, 0), ("b.weight", [4], 0, 140)]), "'b.weight': data offset"),
    "overlap": (dict(tensors=[("a.weight", [64, 2], 8, 0), ("b.weight", [4], 0, 128)]), "overlap"),
    "truncated data": (dict(data_size=170), "up to the end of tensor 'b.weight'"),
    "orig shape": (
        dict(kv=[(b"comfy.gguf.orig_shape.a.weight", 9, struct.pack("<IQii", 5, 2, 3, 64))]),
        "'a.weight': comfy.gguf.orig_shape.a.weight is [3, 64]",
    ),
}


@pytest.mark.parametrize("case", list(DEFECTS))
def test_every_structural_defect_is_named(tmp_path, case):
    kw, fragment = DEFECTS[case]
    path = tmp_path / "broken.gguf"
    path.write_bytes(build(**kw))
    with pytest.raises(CheckpointError) as e:
        GGUFFile(path)
    assert str(path) in str(e.value) and fragment in str(e.value), str(e.value)


def test_a_file_cut_short_names_the_tensor_it_cuts(tmp_path):
    path = G.write_gguf(tmp_path / "cut.gguf", G.tiny_config(num_layers=1), "Q4_0")
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match=r"truncated .* up to the end of tensor '[a-z_.0-9]+'"):
        GGUFFile(path)
