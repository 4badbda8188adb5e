"""Tiny Qwen2.5-VL text encoders as llama.cpp GGUF files (a language model and its mmproj), and the test oracle.

Written with the `gguf` package (a test dependency) the way llama.cpp's convert_hf_to_gguf.py writes Qwen2.5-VL
(Qwen2VLModel, Qwen2VLVisionModel): tensor names by gguf's own TensorNameMap (MODEL_ARCH.QWEN2VL, MODEL_ARCH.MMPROJ)
after the converter's steps (the vision qkv split into q / k / v, the Conv3d patch embedding split into its two
temporal slices, 4-D each), the metadata keys it writes (`qwen2vl.*` with `rope.dimension_sections` padded to 4;
`clip.*` with `clip.projector_type` "qwen2.5vl_merger" and `n_wa_pattern`), llama-quantize's tensor types (1-D
tensors F32; 2-D weights in the file's type, F16 where a row does not split into its blocks; the mmproj's patch
embedding F16 in an F16 file, else F32). `types` overrides single tensors (as Q4_K_M's Q6_K layers).
Values: gguf's quantisers on the reference weights where gguf has one (F32, F16, BF16, Q8_0, Q5_0, ...); valid
random blocks with the weight's spread for the k-quants (gguf cannot quantise them).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
import torch

from qwen_image_core import quant_gguf as Q
from tools.checkpoints import gguf as G
from tools.checkpoints.qwen_vl import legacy_state_dict

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
PATCH = "v.patch_embd.weight"  # + ".1": the second temporal slice
SPLIT = ("q", "k", "v")  # the vision qkv's thirds


def text_names(sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{GGUF name: legacy name} of the language model's tensors (lm_head included), by gguf's tensor map."""
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2VL, layers)
    out = {}
    for k in sd:
        if k.startswith(("model.", "lm_head.")):
            out[names.get_name(k, try_suffixes=(".weight", ".bias"))] = k
    return out


def vision_parts(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, list[str], int, bool]]:
    """{legacy name: (how, GGUF names, dim, stacked)} of the vision tower, after the converter's splits."""
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("visual.blocks."))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, depth)
    out = {}
    for k in sd:
        if not k.startswith("visual."):
            continue
        if ".qkv." in k:
            parts = [names.get_name(k.replace("qkv", s), try_suffixes=(".weight", ".bias")) for s in SPLIT]
            out[k] = (parts, 0, False)
        elif k == "visual.patch_embed.proj.weight":
            out[k] = ([PATCH, PATCH + ".1"], 2, True)
        else:
            out[k] = ([names.get_name(k, try_suffixes=(".weight", ".bias"))], 0, False)
    return out


def tensor_type(name: str, shape: tuple[int, ...], qtype: str) -> str:
    """The type llama-quantize (text) or the converter (mmproj) gives a tensor in a file of type `qtype`."""
    if name.startswith(PATCH):
        return "F16" if qtype == "F16" else "F32"
    if len(shape) == 1 or qtype == "F32":
        return "F32"
    if Q.TYPES[qtype].plain is None and shape[-1] % Q.TYPES[qtype].block:
        return "F16"
    return qtype


def encode(name: str, x: np.ndarray, qtype: str, seed: int) -> np.ndarray:
    """The stored form of one float32 tensor in type `qtype` (gguf's quantiser, or random k-quant blocks)."""
    if qtype == "F32":
        return x
    if qtype not in Q.TYPES:  # a type QwenPix does not read (IQ4_NL, ...): zero blocks, for the refusals
        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        return np.zeros((*x.shape[:-1], x.shape[-1] // block * nbytes), np.uint8)
    if qtype == "F16":
        return x.astype(np.float16)
    if qtype in G.QUANTISABLE:
        return gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])
    return G.random_blocks(name, x.shape, qtype, float(x.std()) or 1.0, seed)


def _add(writer, name: str, t: torch.Tensor, qtype: str, types: Mapping[str, str], seed: int) -> None:
    x = t.detach().float().contiguous().numpy()
    kind = types.get(name) or tensor_type(name, x.shape, qtype)
    writer.add_tensor(name, encode(name, x, kind, seed), raw_dtype=gguf.GGMLQuantizationType[kind])


def text_metadata(arch: str, name: str, t) -> dict[str, object]:
    """The `<arch>.*` metadata llama.cpp's converter writes for a Qwen-VL language model of config `t`."""
    rope = t.rope_parameters
    return {
        "general.name": name, f"{arch}.context_length": t.max_position_embeddings,
        f"{arch}.embedding_length": t.hidden_size, f"{arch}.block_count": t.num_hidden_layers,
        f"{arch}.feed_forward_length": t.intermediate_size, f"{arch}.attention.head_count": t.num_attention_heads,
        f"{arch}.attention.head_count_kv": t.num_key_value_heads, f"{arch}.rope.freq_base": rope["rope_theta"],
        f"{arch}.attention.layer_norm_rms_epsilon": t.rms_norm_eps,
        f"{arch}.rope.dimension_sections": [*rope["mrope_section"], 0],
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
    }  # fmt: skip


def write_language_model(
    path, sd: Mapping[str, torch.Tensor], names: Mapping[str, str], arch: str, real: Mapping[str, object],
    qtype: str, *, types: Mapping[str, str], lm_head: bool, seed: int, metadata: Mapping[str, object],
) -> Path:  # fmt: skip
    """A language-model GGUF: metadata `real` updated by `metadata` (None drops a key), then the tensors
    {GGUF name: state-dict name} of `names` (lm_head only if asked) in file type `qtype`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    _metadata(writer, {**real, **metadata})
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType[G.FILE_TYPES[qtype]])
    for key, legacy in names.items():
        if lm_head or not legacy.startswith("lm_head."):
            _add(writer, key, sd[legacy], qtype, types, seed)
    G.finish(writer)
    return path


def write_text(
    path, model, qtype: str = "Q8_0", seed: int = 0, *, types: Mapping[str, str] = {}, lm_head: bool = True,
    arch: str = "qwen2vl", name: str = "Qwen2.5 VL 7B Instruct", metadata: Mapping[str, object] = {},
) -> Path:  # fmt: skip
    """The language model of `model` (transformers' Qwen2.5-VL, see tools.checkpoints.qwen_vl) as llama.cpp's
    `<arch>` GGUF of file type `qtype`. `metadata`: keys to change (a value) or drop (None) after the real ones."""
    sd = legacy_state_dict(model)
    real = text_metadata(arch, name, model.config.text_config)
    return write_language_model(path, sd, text_names(sd), arch, real, qtype, types=types, lm_head=lm_head, seed=seed,
                                metadata=metadata)  # fmt: skip


def write_mmproj(
    path, model, qtype: str = "F16", seed: int = 0, *, types: Mapping[str, str] = {},
    metadata: Mapping[str, object] = {}, drop: tuple[str, ...] = (),
) -> Path:  # fmt: skip
    """The vision tower and merger of `model` as llama.cpp's mmproj GGUF (architecture "clip"); `drop`: tensors
    left out."""
    sd, v = legacy_state_dict(model), model.config.vision_config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch="clip")
    full = v.fullatt_block_indexes
    real = {
        "general.type": "mmproj", "clip.has_vision_encoder": True, "clip.projector_type": "qwen2.5vl_merger",
        "clip.vision.projection_dim": model.config.text_config.hidden_size, "clip.vision.image_size": 560,
        "clip.vision.patch_size": v.patch_size, "clip.vision.embedding_length": v.hidden_size,
        "clip.vision.feed_forward_length": v.intermediate_size, "clip.vision.block_count": v.depth,
        "clip.vision.attention.head_count": v.num_heads, "clip.vision.image_mean": CLIP_MEAN,
        "clip.vision.image_std": CLIP_STD, "clip.use_silu": True, "clip.vision.n_wa_pattern": full[0] + 1,
        "clip.vision.attention.layer_norm_epsilon": model.config.text_config.rms_norm_eps,
    }  # fmt: skip
    _metadata(writer, {**real, **metadata})
    writer.add_file_type(gguf.LlamaFileType[G.FILE_TYPES[qtype]])
    for legacy, (keys, dim, stacked) in vision_parts(sd).items():
        t = sd[legacy]
        pieces = t.unbind(dim) if stacked else t.chunk(len(keys), dim)
        for key, piece in zip(keys, pieces, strict=True):
            if key not in drop:
                _add(writer, key, piece, qtype, types, seed)
    G.finish(writer)
    return path


def _metadata(writer, values: Mapping[str, object]) -> None:
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_array(key, list(value))


def reference_weights(text: Path, mmproj: Path | None, model) -> dict[str, torch.Tensor]:
    """The float32 weights the files mean, legacy-named (lm_head dropped): gguf's own reader and dequantisers
    (`gguf.dequantized`), the converter's splits undone by this writer's own maps."""
    sd = legacy_state_dict(model)
    values = G.dequantized(text)
    out = {legacy: values[key] for key, legacy in text_names(sd).items() if not legacy.startswith("lm_head.")}
    if mmproj is not None:
        values = G.dequantized(mmproj)
        for legacy, (keys, dim, stacked) in vision_parts(sd).items():
            parts = [values[k] for k in keys]
            out[legacy] = torch.stack(parts, dim) if stacked else torch.cat(parts, dim)
    return out


def stored_bytes(*paths: Path, skip: tuple[str, ...] = ("output.weight",)) -> int:
    """Bytes of the files' tensors (what a loader keeps packed in memory), `skip`ped ones left out."""
    total = 0
    for p in paths:
        total += sum(int(t.n_bytes) for t in gguf.GGUFReader(str(p)).tensors if t.name not in skip)
    return total
