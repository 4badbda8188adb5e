"""Tiny random Qwen-Image DiT GGUF files in the real layout (city96's / QuantStack's), and the test oracle.

Written with the `gguf` package (llama.cpp's Python writer; a test dependency, never needed to read):
ComfyUI's Qwen-Image key names (as converted from the Comfy-Org files: no prefix, or optionally
`model.diffusion_model.`), `general.architecture` = "qwen_image", `general.quantization_version` and
`general.file_type`. Tensor types follow ComfyUI-GGUF's convert.py and its patched llama-quantize: 1-D tensors
(norms, biases) and tensors of at most 1024 values in F32; in a quantised file img_in in F32 and txt_in in F16,
every other 2-D weight in the file's type, F16 where a row does not split into whole blocks. A BF16 / F16 file
stores the 2-D weights in BF16 / F16, an F32 file everything in F32.

Values: gguf's own quantisers applied to the float32 random weights of `dit.random_tensor` where gguf has one
(F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1); valid random blocks for the k-quants, which gguf cannot
quantise (random bits, float16 scales sized to the weight's spread and minima centring it), or for every type
with `random_blocks=True` (fast, for large files).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
import torch

from qwen_image_core import quant_gguf as Q
from qwen_image_core.formats.dit import GGUF_CONFIG_KEY
from qwen_image_core.mmdit import MMDiTConfig
from tools.checkpoints import dit

ARCH = "qwen_image"
ORIG_SHAPE = "comfy.gguf.orig_shape."
QUANT_THRESHOLD = 1024  # convert.py: tensors of at most this many values stay F32
KEEP_F32, KEEP_F16 = ("img_in.",), ("txt_in.",)  # the patched llama-quantize's high-precision tensors
QUANTISABLE = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")  # gguf.quants.quantize has these
# minima that centre random blocks: the min field = factor x d (k-quants: dmin, Q4_1 / Q5_1: m, negative)
CENTRE = {"Q4_1": ("m", -7.5), "Q5_1": ("m", -15.5), "Q2_K": ("dmin", 1.5), "Q4_K": ("dmin", 7.5),
          "Q5_K": ("dmin", 15.5)}  # fmt: skip
FILE_TYPES = {
    "F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0", "Q6_K": "MOSTLY_Q6_K",
    "Q5_K": "MOSTLY_Q5_K_M", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q4_K": "MOSTLY_Q4_K_M",
    "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q3_K": "MOSTLY_Q3_K_M", "Q2_K": "MOSTLY_Q2_K",
}  # fmt: skip
TYPES = tuple(FILE_TYPES)  # every type the published Qwen-Image GGUFs use
# A tiny DiT whose widths split into k-quant super-blocks (256): 2 heads x 128, text width 256 (the smoke
# text encoder's); its sizes are implied by the shapes, so the files need no config.
TINY = dict(num_layers=2, num_heads=2, head_dim=128, mlp_dim=1024, text_dim=256, rope_axes=(16, 56, 56))


def tiny_config(**kw) -> MMDiTConfig:
    return MMDiTConfig(**{**TINY, **kw})


def tensor_type(name: str, shape: tuple[int, ...], qtype: str) -> str:
    """The type convert.py / the patched llama-quantize give a tensor in a file of type `qtype`."""
    if len(shape) == 1 or int(np.prod(shape)) <= QUANT_THRESHOLD or qtype == "F32":
        return "F32"
    if qtype in ("F16", "BF16"):
        return qtype
    if name.startswith(KEEP_F32):
        return "F32"
    if name.startswith(KEEP_F16) or shape[-1] % Q.TYPES[qtype].block:
        return "F16"
    return qtype


def random_blocks(name: str, shape: tuple[int, ...], qtype: str, spread: float, seed: int) -> np.ndarray:
    """Valid random blocks of `qtype` for a tensor: random bits, float16 scales giving values of about `spread`."""
    t = Q.TYPES[qtype]
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()) + t.id)
    rows, n = int(np.prod(shape[:-1])), shape[-1] // t.block
    blocks = torch.randint(0, 256, (rows * n, t.nbytes), generator=g, dtype=torch.uint8).numpy()

    def set_scales(d: float, out: np.ndarray) -> np.ndarray:
        values = {"d": d}
        if qtype in CENTRE:
            values[CENTRE[qtype][0]] = CENTRE[qtype][1] * d
        for field, v in values.items():
            o, _ = t.fields[field]
            out[:, o : o + 2] = np.full((len(out), 1), v, np.float16).view(np.uint8)
        return out

    unit = gguf.quants.dequantize(set_scales(1.0, blocks[:256].copy()), gguf.GGMLQuantizationType[qtype])
    return set_scales(spread / max(float(unit.std()), 1e-12), blocks).reshape(rows, n * t.nbytes)


def encode(name: str, shape: tuple[int, ...], qtype: str, seed: int, random: bool = False) -> np.ndarray:
    """The stored form of one tensor: float arrays for F32 / F16, uint8 blocks [rows, bytes] otherwise."""
    if Q.TYPES[qtype].plain is None and (random or qtype not in QUANTISABLE):
        return random_blocks(name, shape, qtype, shape[-1] ** -0.5, seed)  # dit.random_tensor's spread
    x = dit.random_tensor(name, shape, seed).numpy()
    if qtype == "F32":
        return x
    if qtype == "F16":
        return x.astype(np.float16)
    return gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])


def write_gguf(
    path, cfg: MMDiTConfig, qtype: str = "Q4_K", seed: int = 0, prefix: str = "", *, types: Mapping[str, str] = {},
    random: bool = False, arch: str | None = ARCH, zero_cond_t: bool = False, reshaped: tuple[str, ...] = (),
) -> Path:  # fmt: skip
    """A GGUF DiT of file type `qtype`; `types` overrides the type of single tensors (mixed files, e.g. Q4_K_M's
    Q6_K layers); `random=True`: random blocks for every quantised type; `arch=None`: no architecture key (as
    stable-diffusion.cpp writes); `zero_cond_t`: the Edit-2511 marker tensor; `reshaped`: tensors stored as
    [n / 256, 256] with their shape in `comfy.gguf.orig_shape.<name>` (convert.py's shape fix for SD UNets)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch=arch or "", dry_run=False)
    if arch is None:
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[qtype]])
    meta = dit.config_metadata(cfg)
    if meta:
        writer.add_string(GGUF_CONFIG_KEY, meta["config"])
    for name, shape in dit.shapes(cfg).items():
        t = types.get(name) or tensor_type(name, shape, qtype)
        if name in reshaped:
            writer.add_array(ORIG_SHAPE + prefix + name, list(shape))
            shape = (int(np.prod(shape)) // 256, 256)
        data = encode(name, shape, t, seed, random)
        writer.add_tensor(prefix + name, data, raw_dtype=gguf.GGMLQuantizationType[t])
    if zero_cond_t:
        writer.add_tensor(prefix + "__index_timestep_zero__", np.zeros(0, np.float32))
    finish(writer)
    return path


def finish(writer: gguf.GGUFWriter) -> None:
    """Write a GGUFWriter's header, metadata and tensors to its file and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dequantized(path) -> dict[str, torch.Tensor]:
    """The float32 weights a GGUF file means, by gguf's own reader and dequantisers (the reference), torch shapes
    (ComfyUI-GGUF's convention: the dims reversed, or `comfy.gguf.orig_shape.<name>`), prefix stripped."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        field = reader.get_field(ORIG_SHAPE + t.name)
        shape = [int(field.parts[i][0]) for i in field.data] if field else [int(d) for d in reversed(t.shape)]
        values = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
        out[t.name] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
    prefix = dit.PREFIX if sum(k.startswith(dit.PREFIX) for k in out) * 2 >= len(out) else ""
    return {k.removeprefix(prefix): v for k, v in out.items() if k != prefix + "__index_timestep_zero__"}


def file_types(path) -> dict[str, str]:
    """{tensor name: ggml type name} by gguf's reader."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
