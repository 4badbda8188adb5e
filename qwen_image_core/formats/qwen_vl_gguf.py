"""Qwen2.5-VL text encoders in GGUF: llama.cpp's layout (the files unsloth, ggml-org and lmstudio publish and
ComfyUI-GGUF's CLIPLoaderGGUF reads), names and sizes as data, read with `formats.gguf` (no `gguf` package).

llama.cpp splits a VL model in two files (convert_hf_to_gguf.py: Qwen2VLModel and Qwen2VLVisionModel):

* the language model, `general.architecture` "qwen2vl": `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v,
  attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}`, `output_norm`, and `output` (lm_head: never read). q/k/v
  carry biases; nothing is permuted (llama.cpp permutes q/k only for its llama architecture). Sizes are
  `qwen2vl.*` metadata (`TEXT_METADATA`), the M-RoPE sections as `rope.dimension_sections` with a fourth, unused
  entry ([16, 24, 24, 0]). Tokenizer metadata is ignored: the tokenizer is ComfyUI's Qwen2.5 one, whose ids the
  table must hold (`TOKENIZER_IDS`).
* the vision tower and merger, a separate "mmproj" file, architecture "clip", `clip.projector_type`
  "qwen2.5vl_merger": `v.patch_embd.weight` and `v.patch_embd.weight.1` (the Conv3d's two temporal slices, stacked
  back on dim 2), `v.blk.N.{ln1, ln2, attn_q, attn_k, attn_v (split from qkv: joined back on dim 0), attn_out,
  ffn_gate, ffn_up, ffn_down}`, `v.post_ln` (the merger's RMSNorm), `mm.0` / `mm.2` (the merger's MLP). Sizes are
  `clip.vision.*` metadata; the full-attention blocks are every `n_wa_pattern`-th.

The mmproj is looked for next to the language model as ComfyUI-GGUF does (a `*mmproj*.gguf` whose name contains
the model's name without its quant suffix: `Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf` <- `Qwen2.5-VL-7B-Instruct-
mmproj-F16.gguf`), else the only `*mmproj*.gguf` in the folder (unsloth's `mmproj-F16.gguf` as downloaded), or
named explicitly. Without one the encoder is text-only and an edit says what to add. Sizes in the metadata win
over guesses and are checked against the tensors: a mismatch is a CheckpointError naming the file and the key.
"""

from __future__ import annotations

import re
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import quant_gguf as Q
from ..checkpoint import CheckpointError
from . import gguf
from .qwen_vl import _value

TEXT_ARCH, VISION_ARCH = "qwen2vl", "clip"
# -- names: GGUF tensor -> legacy name (the ComfyUI / transformers-4 names the encoder's modules carry)
TEXT_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
TEXT_LAYER = {  # "blk.N." + key -> "model.layers.N." + value
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}  # fmt: skip
TEXT_SKIPPED = ("output.weight",)  # lm_head (absent where tied to token_embd): encoding never uses it
VISION_GLOBAL = {
    "v.post_ln.weight": "visual.merger.ln_q.weight",
    "mm.0.weight": "visual.merger.mlp.0.weight", "mm.0.bias": "visual.merger.mlp.0.bias",
    "mm.2.weight": "visual.merger.mlp.2.weight", "mm.2.bias": "visual.merger.mlp.2.bias",
}  # fmt: skip
VISION_LAYER = {  # "v.blk.N." + key -> "visual.blocks.N." + value
    "ln1.weight": "norm1.weight", "ln2.weight": "norm2.weight",
    "attn_out.weight": "attn.proj.weight", "attn_out.bias": "attn.proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight", "ffn_down.bias": "mlp.down_proj.bias",
}  # fmt: skip
# tensors the converter split: legacy name <- (GGUF parts, dim, stacked: a new dim rather than concatenated)
VISION_JOINED = {"visual.patch_embed.proj.weight": (("v.patch_embd.weight", "v.patch_embd.weight.1"), 2, True)}
VISION_JOINED_LAYER = {
    "attn.qkv.weight": (("attn_q.weight", "attn_k.weight", "attn_v.weight"), 0, False),
    "attn.qkv.bias": (("attn_q.bias", "attn_k.bias", "attn_v.bias"), 0, False),
}
# -- sizes: metadata key -> QwenVLConfig / VisionConfig field
TEXT_METADATA = {  # under "<architecture>."
    "vocab_size": "vocab_size", "embedding_length": "hidden_size", "block_count": "num_layers",
    "feed_forward_length": "intermediate_size", "attention.head_count": "num_heads",
    "attention.head_count_kv": "num_kv_heads", "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_eps", "rope.freq_base": "rope_theta",
    "rope.dimension_sections": "mrope_section",
}  # fmt: skip
VISION_METADATA = {
    "clip.vision.embedding_length": "hidden_size", "clip.vision.feed_forward_length": "intermediate_size",
    "clip.vision.block_count": "depth", "clip.vision.attention.head_count": "num_heads",
    "clip.vision.projection_dim": "out_hidden_size", "clip.vision.patch_size": "patch_size",
    "clip.vision.spatial_merge_size": "merge_size", "clip.vision.window_size": "window_size",
    "clip.vision.rope.freq_base": "rope_theta", "clip.vision.fullatt_block_indexes": "full_attention_blocks",
}  # fmt: skip
# not read: clip.vision.attention.layer_norm_epsilon, the converter's copy of the language model's rms_norm_eps; the
# tower's norms use 1e-6 whatever that is (transformers' Qwen2.5-VL vision blocks), VisionConfig's default
WA_PATTERN = "clip.vision.n_wa_pattern"  # llama.cpp's: blocks n-1, 2n-1, ... attend over the whole image (where
# fullatt_block_indexes, written by other converters, is absent)
# (field, tensor, dim, times): the tensor's size along dim must be the field's value (x the field `times`)
TEXT_WITNESSES = (
    ("vocab_size", "token_embd.weight", 0, None), ("hidden_size", "token_embd.weight", 1, None),
    ("intermediate_size", "blk.0.ffn_gate.weight", 0, None), ("num_heads", "blk.0.attn_q.weight", 0, "head_dim"),
    ("num_kv_heads", "blk.0.attn_k.weight", 0, "head_dim"),
)  # fmt: skip
VISION_WITNESSES = (
    ("hidden_size", "v.patch_embd.weight", 0, None), ("patch_size", "v.patch_embd.weight", 2, None),
    ("intermediate_size", "v.blk.0.ffn_gate.weight", 0, None), ("out_hidden_size", "mm.2.weight", 0, None),
)  # fmt: skip
TOKENIZER_IDS = 151669  # ComfyUI's Qwen2.5 tokenizer: ids 0..151668 (text and special tokens)
PROJECTORS = ("qwen2.5vl_merger",)  # clip.projector_type of Qwen2.5-VL's vision tower
OTHER_PROJECTORS = {"qwen2vl_merger": "Qwen2-VL (first version)", "qwen3vl_merger": "Qwen3-VL",
                    "qwen2.5o": "Qwen2.5-Omni"}  # fmt: skip
OTHER_ARCHS = {  # general.architecture -> (what it is, what to do)
    VISION_ARCH: ("a vision projector (mmproj)",
                  "choose the language-model GGUF beside it, which loads this file as its vision tower"),
    "qwen_image": ("a Qwen-Image diffusion model (DiT)", "load it with the Qwen-Image diffusion model loader"),
    "qwen2": ("a Qwen2 / Qwen2.5 language model without Qwen2.5-VL's multimodal RoPE",
              "Qwen-Image's encoder is Qwen2.5-VL-7B-Instruct (e.g. unsloth's Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf)"),
    "qwen25vl": ("an Ollama Qwen2.5-VL file (language model and vision tower in one file, Ollama's own names)",
                 "use llama.cpp's files (e.g. unsloth's Qwen2.5-VL-7B-Instruct-*.gguf with mmproj-F16.gguf)"),
    "llama": ("a Llama language model", "Qwen2.5-VL has q/k/v biases and llama.cpp permutes llama's q/k"),
    "qwen3vl": ("the Qwen3-VL language model of Qwen-Image-2.1", "load it with 'Load Qwen-Image-2.1 Text Encoder' "
                "(qwen21's load_qwen3_vl)"),
    None: ("a model without an architecture key (as stable-diffusion.cpp writes diffusion models)", ""),
}  # fmt: skip
OTHER_NAMES = ((re.compile(r"qwen2[-_ ]vl", re.I), "Qwen2-VL (the first version), not Qwen2.5-VL"),)
# ComfyUI-GGUF's quant suffix (strip_quant_suffix), plus float file types, taken off a name to match its mmproj
QUANT_SUFFIX = re.compile(r"[-_.]?(?:ud-)?(?:i?q[0-9]_[a-z0-9_\-]{1,8}|b?f16|f32)$", re.I)
MMPROJ_HINT = (
    "for editing put the Qwen2.5-VL mmproj GGUF (e.g. unsloth's mmproj-F16.gguf for Qwen2.5-VL-7B-Instruct) next to "
    "it, as the folder's only *mmproj*.gguf or named after it (e.g. {stem}-mmproj-F16.gguf), or load a .safetensors "
    "text encoder"
)


@dataclass(frozen=True)
class Source:
    """Where one legacy-named tensor comes from: one GGUF tensor, or parts joined along `dim`."""

    file: gguf.GGUFFile
    keys: tuple[str, ...]
    dim: int = 0
    stacked: bool = False

    def shape(self) -> tuple[int, ...]:
        shapes = [self.file.shape(k) for k in self.keys]
        if len(shapes) == 1:
            return shapes[0]
        if self.stacked:
            return (*shapes[0][: self.dim], len(shapes), *shapes[0][self.dim :])
        return (*shapes[0][: self.dim], sum(s[self.dim] for s in shapes), *shapes[0][self.dim + 1 :])


def _float32(v):
    """A float32 metadata value as the shortest decimal that is the same float32 (1e-06, not 9.99999997e-07)."""
    if not isinstance(v, float):
        return v
    raw = struct.pack("<f", v)
    for digits in range(1, 10):
        short = float(f"{v:.{digits}g}")
        if struct.pack("<f", short) == raw:
            return short
    return v


def refuse_other(f: gguf.GGUFFile, what: str) -> None:
    """Raise unless `f` is a Qwen2.5-VL language model (architecture qwen2vl, not a relative by name)."""
    arch = f.architecture
    if arch != TEXT_ARCH:
        other, fix = _other(arch)
        raise CheckpointError(f"{f.path}: this GGUF file holds {other} (general.architecture {arch!r}), not {what}"
                              + (f"; {fix}" if fix else ""))  # fmt: skip
    name = " ".join(str(f.metadata.get(k, "")) for k in ("general.name", "general.basename"))
    for pattern, other in OTHER_NAMES:
        if pattern.search(name):
            raise CheckpointError(f"{f.path}: this GGUF file is {other} (general.name {name.strip()!r})")


def _other(arch) -> tuple[str, str]:
    return OTHER_ARCHS.get(arch) or (gguf.ARCHITECTURES.get(arch, f"a model of architecture {arch!r}"), "")


def _plan(f: gguf.GGUFFile, glob: Mapping, layer: Mapping, joined: Mapping, joined_layer: Mapping, blk: str,
          legacy_blk: str, skipped=(), layers: int | None = None, what="Qwen2.5-VL") -> dict[str, Source]:  # fmt: skip
    """{legacy name: Source} for every tensor of the layout, checked complete and without strangers."""
    n = _blocks(f, blk) if layers is None else layers
    plan = {legacy: Source(f, (key,)) for key, legacy in glob.items()}
    plan |= {legacy: Source(f, keys, dim, stacked) for legacy, (keys, dim, stacked) in joined.items()}
    for i in range(n):
        plan |= {f"{legacy_blk}{i}.{legacy}": Source(f, (f"{blk}{i}.{key}",)) for key, legacy in layer.items()}
        plan |= {f"{legacy_blk}{i}.{legacy}": Source(f, tuple(f"{blk}{i}.{k}" for k in keys), dim, stacked)
                 for legacy, (keys, dim, stacked) in joined_layer.items()}  # fmt: skip
    wanted = [k for s in plan.values() for k in s.keys]
    missing = [k for k in wanted if k not in f.entries]
    strangers = sorted(set(f.entries) - set(wanted) - set(skipped))
    for problem, keys in (("lacks", missing), ("has tensors this layout does not know:", strangers)):
        if keys:
            more = f" (+{len(keys) - 6} more)" if len(keys) > 6 else ""
            raise CheckpointError(f"{f.path}: not a complete {what} GGUF of {n} blocks: it {problem} "
                                  f"{', '.join(keys[:6])}{more}")  # fmt: skip
    return plan


def _sizes(f: gguf.GGUFFile, table: Mapping[str, str], prefix: str = "") -> tuple[dict, dict[str, str]]:
    """({field: value}, {field: metadata key}) of the metadata keys present, types checked."""
    out, keys = {}, {}
    for key, name in table.items():
        v = f.metadata.get(prefix + key)
        if v is None:
            continue
        where = f"{f.path}: metadata {prefix + key}"
        if name == "mrope_section" and isinstance(v, list) and len(v) == 4:
            if v[3] != 0:
                raise CheckpointError(f"{where} is {v}: a fourth M-RoPE section is not Qwen-VL's (it is 0 there)")
            v = v[:3]
        out[name], keys[name] = _value(name, _float32(v), where), prefix + key
    return out, keys


def _check(f: gguf.GGUFFile, sizes: dict, keys: dict, witnesses, blocks: tuple[str, int], count: str) -> None:
    """Each size the metadata states against the tensors that show it."""
    for name, tensor, dim, times in witnesses:
        if name not in sizes or tensor not in f.entries:
            continue
        want, got = sizes[name] * (sizes.get(times, 1) if times else 1), f.shape(tensor)[dim]
        if got != want:
            stated = f"{sizes[name]} x {times} {sizes[times]} = {want}" if times else f"{want}"
            raise CheckpointError(f"{f.path}: metadata {keys[name]} is {stated}, but {tensor} is "
                                  f"{list(f.shape(tensor))}")  # fmt: skip
    blk, n = blocks
    if count in sizes and sizes[count] != n:
        raise CheckpointError(f"{f.path}: metadata {keys[count]} is {sizes[count]}, but the file has {n} {blk}N blocks")


def check_sections(f: gguf.GGUFFile, sizes: dict, keys: dict) -> None:
    """The M-RoPE sections the metadata states must cover half of each head's channels."""
    if "mrope_section" in sizes and "head_dim" in sizes and sum(sizes["mrope_section"]) * 2 != sizes["head_dim"]:
        raise CheckpointError(f"{f.path}: metadata {keys['mrope_section']} {list(sizes['mrope_section'])} does not "
                              f"cover {sizes['head_dim']}-channel heads (it must sum to half of them)")  # fmt: skip


def _blocks(f: gguf.GGUFFile, blk: str) -> int:
    found = {k[len(blk) :].split(".")[0] for k in f.entries if k.startswith(blk)}
    return max((int(i) + 1 for i in found if i.isdigit()), default=0)


def text_layout(f: gguf.GGUFFile) -> tuple[dict[str, Source], dict]:
    """The language model's plan and its QwenVLConfig sizes from the `qwen2vl.*` metadata, checked."""
    refuse_other(f, "a Qwen2.5-VL text encoder")
    sizes, keys = _sizes(f, TEXT_METADATA, TEXT_ARCH + ".")
    if "head_dim" not in sizes and "num_heads" in sizes and "hidden_size" in sizes:  # llama.cpp: width / heads
        if sizes["hidden_size"] % sizes["num_heads"]:
            raise CheckpointError(f"{f.path}: metadata {keys['hidden_size']} {sizes['hidden_size']} does not split "
                                  f"into {keys['num_heads']} {sizes['num_heads']} heads")  # fmt: skip
        sizes["head_dim"], keys["head_dim"] = sizes["hidden_size"] // sizes["num_heads"], keys["num_heads"]
    check_sections(f, sizes, keys)
    _check(f, sizes, keys, TEXT_WITNESSES, ("blk.", _blocks(f, "blk.")), "num_layers")
    plan = _plan(f, TEXT_GLOBAL, TEXT_LAYER, {}, {}, "blk.", "model.layers.", TEXT_SKIPPED, sizes.get("num_layers"))
    vocab = plan["model.embed_tokens.weight"].shape()[0]
    if vocab < TOKENIZER_IDS:
        raise CheckpointError(f"{f.path}: token_embd.weight has {vocab} rows; the Qwen2.5 tokenizer needs "
                              f"{TOKENIZER_IDS} (this is not Qwen2.5-VL's vocabulary)")  # fmt: skip
    return plan, sizes


def check_mmproj(f: gguf.GGUFFile, projectors, other_projectors: Mapping[str, str], what: str) -> None:
    """Raise unless `f` is an mmproj file with a vision encoder whose projector type (if stated) is one of
    `projectors` (`what`: the model it must belong to)."""
    if f.architecture != VISION_ARCH:
        raise CheckpointError(f"{f.path}: not a vision projector (mmproj) file; it holds {_other(f.architecture)[0]}")
    if f.metadata.get("clip.has_vision_encoder") is False:
        raise CheckpointError(f"{f.path}: this mmproj file has no vision encoder (clip.has_vision_encoder)")
    kind = f.metadata.get("clip.vision.projector_type", f.metadata.get("clip.projector_type"))
    if kind is not None and kind not in projectors:
        other = other_projectors.get(kind, f"projector {kind!r}")
        raise CheckpointError(f"{f.path}: this mmproj file is the vision tower of {other} (clip.projector_type), "
                              f"not {what}'s")  # fmt: skip


def check_projection(f: gguf.GGUFFile, out: int, text_width: int, keys: Mapping[str, str]) -> None:
    """Raise unless the vision tower's `out` channels are the language model's width."""
    if out != text_width:
        key = keys.get("out_hidden_size", "mm.2.weight")
        raise CheckpointError(f"{f.path}: this vision tower projects to {out} channels ({key}), the language model "
                              f"is {text_width} wide: it belongs to another model size")  # fmt: skip


def vision_layout(f: gguf.GGUFFile, text_width: int) -> tuple[dict[str, Source], dict]:
    """The vision tower's plan and its VisionConfig sizes from an mmproj file, checked against the text width."""
    check_mmproj(f, PROJECTORS, OTHER_PROJECTORS, "Qwen2.5-VL")
    sizes, keys = _sizes(f, VISION_METADATA)
    _check(f, sizes, keys, VISION_WITNESSES, ("v.blk.", _blocks(f, "v.blk.")), "depth")
    plan = _plan(f, VISION_GLOBAL, VISION_LAYER, VISION_JOINED, VISION_JOINED_LAYER, "v.blk.", "visual.blocks.",
                 layers=sizes.get("depth"))  # fmt: skip
    check_projection(f, plan["visual.merger.mlp.2.weight"].shape()[0], text_width, keys)
    depth, pattern = _blocks(f, "v.blk."), f.metadata.get(WA_PATTERN)
    if pattern is not None and "full_attention_blocks" not in sizes:
        pattern = _value("depth", pattern, f"{f.path}: metadata {WA_PATTERN}")
        sizes["full_attention_blocks"] = tuple(i for i in range(depth) if (i + 1) % pattern == 0)
    if any(i >= depth for i in sizes.get("full_attention_blocks", ())):
        raise CheckpointError(f"{f.path}: metadata {keys['full_attention_blocks']} names blocks past the {depth} "
                              "the file has")  # fmt: skip
    return plan, sizes


def find_mmproj(path: Path) -> tuple[Path | None, bool, str]:
    """The mmproj next to a language-model GGUF: (file or None, found by its name, why there is none)."""
    stem = QUANT_SUFFIX.sub("", path.stem.lower())
    found = sorted(p for p in path.parent.iterdir() if p.suffix.lower() == ".gguf" and "mmproj" in p.stem.lower())
    found = [p for p in found if p != path and p.is_file()]
    named = [p for p in found if stem and stem in p.stem.lower()]
    if len(named) > 1:
        warnings.warn(f"{path}: several mmproj files are named after it ({', '.join(p.name for p in named)}); "
                      f"using {named[0].name}", stacklevel=3)  # fmt: skip
    if named:
        return named[0], True, ""
    if len(found) == 1:
        return found[0], False, ""
    if not found:
        return None, False, "no *mmproj*.gguf file lies next to it"
    return None, False, (f"{len(found)} mmproj files lie next to it ({', '.join(p.name for p in found)}) and none "
                         f"is named after it ({stem!r})")  # fmt: skip


@dataclass
class EncoderGGUF:
    """A GGUF text encoder's files, checked: `plan` (legacy name -> Source), `known` (config sizes, "vision":
    VisionConfig sizes), `note` (why there is no vision tower; None with one)."""

    path: Path
    text: gguf.GGUFFile
    vision: gguf.GGUFFile | None
    plan: dict[str, Source]
    known: dict
    note: str | None
    floats: frozenset[str] = frozenset()  # 2-D GGUF tensors dequantised at load even when quantised (tables)

    @property
    def files(self) -> list[Path]:
        return [self.path] + ([self.vision.path] if self.vision is not None else [])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: s.shape() for name, s in self.plan.items()}

    @property
    def storage(self) -> str:
        text = gguf.describe(self.text, [k for s in self.plan.values() if s.file is self.text for k in s.keys])
        if self.vision is None:
            return f"{text}; no vision tower (text-to-image only)"
        keys = [k for s in self.plan.values() if s.file is self.vision for k in s.keys]
        return f"{text}; vision tower {self.vision.path.name}: {gguf.describe(self.vision, keys)}"

    def weights(self) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
        """(plain tensors, packed layers) under legacy names for `formats.common.assign_weights`: 2-D weights in a
        quantised type stay as the file's blocks (the token embedding too: it dequantises gathered rows)."""
        loaded = {}
        for f in (self.text, self.vision):
            if f is not None:
                keys = [k for s in self.plan.values() if s.file is f for k in s.keys]
                packable = lambda name, shape: len(shape) == 2 and name not in self.floats  # noqa: E731
                plain, packed = gguf.load_weights(f, {k: k for k in keys}, packable)
                loaded[f.path] = plain | packed
        tensors, packed = {}, {}
        for name, s in self.plan.items():
            out = _join([loaded[s.file.path][k] for k in s.keys], s.dim, s.stacked)
            (packed if isinstance(out, tuple) else tensors)[name] = out
        return tensors, packed


def _join(parts: list, dim: int, stacked: bool):
    """One tensor (or packed layer) from converter-split parts: rows of blocks of one type join as they are."""
    if len(parts) == 1:
        return parts[0]
    types = {p[1].type.name if isinstance(p, tuple) else None for p in parts}
    if not stacked and dim == 0 and len(types) == 1 and None not in types:
        quant = parts[0][1]
        rows = sum(p[1].shape[0] for p in parts)
        return torch.cat([p[0] for p in parts]), Q.GGUFQuant(quant.type, (rows, *quant.shape[1:])), {}
    floats = [p[1].dequantize(p[0], {}, torch.float32) if isinstance(p, tuple) else p for p in parts]
    if len({t.dtype for t in floats}) > 1:  # parts in different float types: float32 holds them all exactly
        floats = [t.float() for t in floats]
    return torch.stack(floats, dim) if stacked else torch.cat(floats, dim)


def open_encoder(path: Path, mmproj: str | Path | bool | None = None, mmap: bool = False, *, text_layout=text_layout,
                 vision_layout=vision_layout, hint: str = MMPROJ_HINT, floats=frozenset()) -> EncoderGGUF:  # fmt: skip
    """Check a language-model GGUF and its vision tower (`mmproj`: None = look next to it, a path = that file,
    False = text only); nothing is read but headers. A vision file found by name or given must fit; one found
    only because it is the folder's single mmproj is skipped with a warning when it does not. The layouts (and
    `hint`, what to put next to it for edits) are Qwen2.5-VL's unless given (`formats.qwen3_vl_gguf`)."""
    path = Path(path)
    text = gguf.GGUFFile(path, mmap=mmap)
    plan, sizes = text_layout(text)
    width = plan["model.embed_tokens.weight"].shape()[1]
    vision, why, strict = None, "", True
    if mmproj is None:
        found, strict, why = find_mmproj(path)
    else:
        found, why = (None, "loaded with mmproj=False") if mmproj is False else (Path(mmproj), "")
    if found is not None:
        try:
            vision = gguf.GGUFFile(found, mmap=mmap)
            vision_plan, sizes["vision"] = vision_layout(vision, width)
        except CheckpointError as e:
            if strict:
                raise
            warnings.warn(f"{path}: not using {found.name}, the only mmproj file next to it: {e}", stacklevel=2)
            vision, why = None, f"{found.name} next to it is not its vision tower"
        else:
            plan |= vision_plan
    note = None
    if vision is None:
        note = (f"{path}: this GGUF text encoder has no vision tower ({why}), so it encodes text-to-image prompts "
                f"only; {hint.format(stem=QUANT_SUFFIX.sub('', path.stem))}")  # fmt: skip
    return EncoderGGUF(path, text, vision, plan, sizes, note, frozenset(floats))
