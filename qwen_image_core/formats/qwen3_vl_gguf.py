"""Qwen3-VL-8B (Qwen-Image-2.1's condition encoder) in GGUF: llama.cpp's layout, names and sizes as data, read
with `formats.gguf` (no `gguf` package), through the Qwen2.5-VL reader's steps (`formats.qwen_vl_gguf`: the
mmproj lookup, the plan of legacy-named sources, the metadata and shape checks, packed loading).

llama.cpp splits the model in two files (convert_hf_to_gguf.py: Qwen3VLTextModel, Qwen3VLVisionModel):

* the language model, `general.architecture` "qwen3vl": `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v,
  attn_output, attn_q_norm, attn_k_norm, ffn_norm, ffn_gate, ffn_up, ffn_down}`, `output_norm`, and `output`
  (lm_head: never read). No biases; nothing is permuted (Qwen3's q/k stay as transformers has them; the q/k
  norms are one head wide). Sizes are `qwen3vl.*` metadata (the Qwen2.5-VL keys, `TEXT_METADATA`; the head
  width `attention.key_length`, else the q norm's length), the M-RoPE sections as `rope.dimension_sections`
  padded with a fourth, unused 0 ([24, 20, 20, 0]), and `n_deepstack_layers`: how many DeepStack features the
  language model adds (after its first layers), checked against the mmproj's mergers.
* the vision tower, a separate "mmproj" file, architecture "clip", `clip.projector_type` "qwen3vl_merger":
  `v.patch_embd.weight` and `v.patch_embd.weight.1` (the Conv3d's two temporal slices, 4-D each: stacked back
  on dim 2), `v.patch_embd.bias`, `v.position_embd` (the learned position table), `v.blk.N.{ln1, ln2}`
  (LayerNorms with biases), `attn_qkv` (fused, as transformers has it: not split), `attn_out`, `ffn_up` /
  `ffn_down` (linear_fc1 / fc2), `v.post_ln` (the final merger's LayerNorm), `mm.0` / `mm.2` (its linear_fc1 /
  fc2), and `v.deepstack.B.{norm, fc1, fc2}`: the DeepStack merger fed by vision block B, numbered by the block
  (transformers numbers them 0, 1, 2 in the order of `deepstack_visual_indexes`), the blocks flagged in
  `clip.vision.is_deepstack_layers` (one bool per block). Sizes are `clip.vision.*` metadata; the temporal
  patch, the position grid and the channels come from the shapes; `clip.vision.image_size` (the position grid
  times the patch) is checked. Not read: `attention.layer_norm_epsilon` (the converter writes the language
  model's rms_norm_eps there; the tower's LayerNorms use 1e-6 as transformers'), image_mean / image_std (the
  encoder's preprocessing is the reference's own), `use_gelu`.

The mmproj is found next to the language model as for Qwen2.5-VL (`qwen_vl_gguf.find_mmproj`). Qwen2.5-VL files
are refused here with a pointer to the v1 loader (and the v1 reader refuses these).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..checkpoint import CheckpointError
from . import gguf
from . import qwen_vl_gguf as V1
from .qwen_vl_gguf import EncoderGGUF, _blocks, _check, _plan, _sizes, check_sections

TEXT_ARCH, VISION_ARCH, WHAT = "qwen3vl", "clip", "Qwen3-VL"
# -- names: GGUF tensor -> canonical name (formats.qwen3_vl: `model.*`, `visual.*`)
TEXT_GLOBAL, TEXT_SKIPPED = V1.TEXT_GLOBAL, V1.TEXT_SKIPPED  # token_embd, output_norm; output (lm_head) skipped
TEXT_LAYER = {  # "blk.N." + key -> "model.layers.N." + value: Qwen2.5-VL's without the q/k/v biases, + q/k norms
    **{k: v for k, v in V1.TEXT_LAYER.items() if not k.endswith(".bias")},
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
}  # fmt: skip
VISION_GLOBAL = {
    "v.patch_embd.bias": "visual.patch_embed.proj.bias", "v.position_embd.weight": "visual.pos_embed.weight",
    "v.post_ln.weight": "visual.merger.norm.weight", "v.post_ln.bias": "visual.merger.norm.bias",
    "mm.0.weight": "visual.merger.linear_fc1.weight", "mm.0.bias": "visual.merger.linear_fc1.bias",
    "mm.2.weight": "visual.merger.linear_fc2.weight", "mm.2.bias": "visual.merger.linear_fc2.bias",
}  # fmt: skip
VISION_LAYER = {  # "v.blk.N." + key -> "visual.blocks.N." + value
    "ln1.weight": "norm1.weight", "ln1.bias": "norm1.bias", "ln2.weight": "norm2.weight", "ln2.bias": "norm2.bias",
    "attn_qkv.weight": "attn.qkv.weight", "attn_qkv.bias": "attn.qkv.bias",
    "attn_out.weight": "attn.proj.weight", "attn_out.bias": "attn.proj.bias",
    "ffn_up.weight": "mlp.linear_fc1.weight", "ffn_up.bias": "mlp.linear_fc1.bias",
    "ffn_down.weight": "mlp.linear_fc2.weight", "ffn_down.bias": "mlp.linear_fc2.bias",
}  # fmt: skip
DEEPSTACK_LAYER = {  # "v.deepstack.<block>." + key -> "visual.deepstack_merger_list.<k>." + value (k: the
    # merger's rank among the DeepStack blocks, in block order)
    "norm.weight": "norm.weight", "norm.bias": "norm.bias", "fc1.weight": "linear_fc1.weight",
    "fc1.bias": "linear_fc1.bias", "fc2.weight": "linear_fc2.weight", "fc2.bias": "linear_fc2.bias",
}  # fmt: skip
DEEPSTACK_BLK = "v.deepstack."
# the converter's split: canonical name <- (GGUF parts, dim, stacked: a new dim rather than concatenated)
VISION_JOINED = {"visual.patch_embed.proj.weight": (("v.patch_embd.weight", "v.patch_embd.weight.1"), 2, True)}
FLOATS = frozenset({"v.position_embd.weight"})  # a table read by rows, not a linear layer: dequantised at load
# -- sizes: metadata key -> Qwen3VLConfig / Vision3Config field
TEXT_METADATA = V1.TEXT_METADATA  # under "qwen3vl."
DEEPSTACK_COUNT = TEXT_ARCH + ".n_deepstack_layers"
VISION_METADATA = {
    "clip.vision.embedding_length": "hidden_size", "clip.vision.feed_forward_length": "intermediate_size",
    "clip.vision.block_count": "depth", "clip.vision.attention.head_count": "num_heads",
    "clip.vision.projection_dim": "out_hidden_size", "clip.vision.patch_size": "patch_size",
    "clip.vision.spatial_merge_size": "merge_size",
}  # fmt: skip
DEEPSTACK_FLAGS, IMAGE_SIZE = "clip.vision.is_deepstack_layers", "clip.vision.image_size"
Q_NORM = "blk.0.attn_q_norm.weight"  # one head wide: the head width where attention.key_length is absent
TEXT_WITNESSES = (("head_dim", Q_NORM, 0, None), *V1.TEXT_WITNESSES)  # the head first: the others use it
VISION_WITNESSES = (
    ("hidden_size", "v.patch_embd.weight", 0, None), ("patch_size", "v.patch_embd.weight", 2, None),
    ("hidden_size", "v.position_embd.weight", 1, None), ("intermediate_size", "v.blk.0.ffn_up.weight", 0, None),
    ("out_hidden_size", "mm.2.weight", 0, None),
)  # fmt: skip
PROJECTORS = ("qwen3vl_merger",)
OTHER_PROJECTORS = {
    "qwen2.5vl_merger": "Qwen2.5-VL (Qwen-Image v1's encoder: its language model loads with 'Load Qwen-Image Text "
    "Encoder')", "qwen2vl_merger": "Qwen2-VL (first version)", "qwen2.5o": "Qwen2.5-Omni",
}  # fmt: skip
OTHER_ARCHS = {  # general.architecture -> (what it is, what to do); the rest as the Qwen2.5-VL reader names them
    "qwen2vl": ("the Qwen2.5-VL language model of Qwen-Image v1", "load it with 'Load Qwen-Image Text Encoder' "
                "(load_text_encoder); Qwen-Image-2.1's encoder is Qwen3-VL-8B (e.g. Qwen3-VL-8B-Instruct-Q8_0.gguf)"),
    "qwen3vlmoe": ("a Qwen3-VL MoE language model (e.g. Qwen3-VL-30B-A3B)",
                   "Qwen-Image-2.1's encoder is Qwen3-VL-8B-Instruct (e.g. Qwen3-VL-8B-Instruct-Q8_0.gguf)"),
    "qwen3": ("a Qwen3 language model without Qwen3-VL's multimodal RoPE",
              "Qwen-Image-2.1's encoder is Qwen3-VL-8B-Instruct (e.g. Qwen3-VL-8B-Instruct-Q8_0.gguf)"),
    VISION_ARCH: ("a vision projector (mmproj)",
                  "choose the Qwen3-VL language-model GGUF beside it, which loads this file as its vision tower"),
}  # fmt: skip
MMPROJ_HINT = (
    "for editing put the Qwen3-VL-8B mmproj GGUF (e.g. mmproj-F16.gguf from the same Qwen3-VL-8B-Instruct GGUF "
    "repository) next to it, as the folder's only *mmproj*.gguf or named after it (e.g. {stem}-mmproj-F16.gguf), "
    "or load a .safetensors Qwen3-VL file with its vision tower (e.g. qwen3vl_8b_bf16)"
)


def refuse_other(f: gguf.GGUFFile) -> None:
    """Raise unless `f` is a Qwen3-VL language model (architecture qwen3vl)."""
    arch = f.architecture
    if arch != TEXT_ARCH:
        other, fix = OTHER_ARCHS.get(arch) or V1._other(arch)
        raise CheckpointError(f"{f.path}: this GGUF file holds {other} (general.architecture {arch!r}), not the "
                              f"{WHAT} text encoder of Qwen-Image-2.1" + (f"; {fix}" if fix else ""))  # fmt: skip


def text_layout(f: gguf.GGUFFile) -> tuple[dict, dict]:
    """The language model's plan and its Qwen3VLConfig sizes from the `qwen3vl.*` metadata, checked."""
    refuse_other(f)
    sizes, keys = _sizes(f, TEXT_METADATA, TEXT_ARCH + ".")
    if "head_dim" not in sizes and Q_NORM in f.entries:
        sizes["head_dim"], keys["head_dim"] = f.shape(Q_NORM)[0], Q_NORM
    _check(f, sizes, keys, TEXT_WITNESSES, ("blk.", _blocks(f, "blk.")), "num_layers")
    check_sections(f, sizes, keys)
    plan = _plan(f, TEXT_GLOBAL, TEXT_LAYER, {}, {}, "blk.", "model.layers.", TEXT_SKIPPED, sizes.get("num_layers"),
                 what=WHAT)  # fmt: skip
    vocab = plan["model.embed_tokens.weight"].shape()[0]
    if vocab < V1.TOKENIZER_IDS:
        raise CheckpointError(f"{f.path}: token_embd.weight has {vocab} rows; the Qwen tokenizer needs "
                              f"{V1.TOKENIZER_IDS} (this is not Qwen3-VL's vocabulary)")  # fmt: skip
    count = f.metadata.get(DEEPSTACK_COUNT)
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        raise CheckpointError(f"{f.path}: metadata {DEEPSTACK_COUNT} is {count!r}, expected a count")
    return plan, sizes


def deepstack_blocks(f: gguf.GGUFFile, depth: int) -> tuple[int, ...]:
    """The vision blocks feeding DeepStack mergers: the `v.deepstack.B` tensors, checked against the flags."""
    found = sorted({int(b) for k in f.entries if k.startswith(DEEPSTACK_BLK)
                    for b in [k[len(DEEPSTACK_BLK) :].split(".")[0]] if b.isdigit()})  # fmt: skip
    if any(b >= depth for b in found):
        raise CheckpointError(f"{f.path}: DeepStack mergers of blocks {found}, but the tower has {depth} blocks")
    flags = f.metadata.get(DEEPSTACK_FLAGS)
    if flags is not None:
        if not isinstance(flags, list) or len(flags) != depth or not all(isinstance(x, bool) for x in flags):
            raise CheckpointError(f"{f.path}: metadata {DEEPSTACK_FLAGS} is {flags!r}, expected {depth} bools (one "
                                  "per vision block)")  # fmt: skip
        flagged = [i for i, x in enumerate(flags) if x]
        if flagged != found:
            raise CheckpointError(f"{f.path}: metadata {DEEPSTACK_FLAGS} flags blocks {flagged}, but the file has "
                                  f"DeepStack mergers ({DEEPSTACK_BLK}B) of blocks {found}")  # fmt: skip
    return tuple(found)


def vision_layout(f: gguf.GGUFFile, text_width: int) -> tuple[dict, dict]:
    """The vision tower's plan and its Vision3Config sizes from an mmproj file, checked against the text width."""
    V1.check_mmproj(f, PROJECTORS, OTHER_PROJECTORS, WHAT)
    sizes, keys = _sizes(f, VISION_METADATA)
    depth = _blocks(f, "v.blk.")
    _check(f, sizes, keys, VISION_WITNESSES, ("v.blk.", depth), "depth")
    blocks = deepstack_blocks(f, sizes.get("depth", depth))
    deepstack = {f"{DEEPSTACK_BLK}{b}.{key}": f"visual.deepstack_merger_list.{i}.{name}"
                 for i, b in enumerate(blocks) for key, name in DEEPSTACK_LAYER.items()}  # fmt: skip
    plan = _plan(f, VISION_GLOBAL | deepstack, VISION_LAYER, VISION_JOINED, {}, "v.blk.", "visual.blocks.",
                 layers=sizes.get("depth"), what=f"{WHAT} mmproj")  # fmt: skip
    sizes["deepstack_layers"] = blocks
    V1.check_projection(f, plan["visual.merger.linear_fc2.weight"].shape()[0], text_width, keys)
    side, patch = math.isqrt(f.shape("v.position_embd.weight")[0]), f.shape("v.patch_embd.weight")[2]
    image = f.metadata.get(IMAGE_SIZE)
    if image is not None and image != side * patch:
        raise CheckpointError(f"{f.path}: metadata {IMAGE_SIZE} is {image!r}, but the position table "
                              f"(v.position_embd.weight) is a {side} x {side} grid of {patch}-px patches")  # fmt: skip
    return plan, sizes


def open_encoder(path: Path, mmproj: str | Path | bool | None = None, mmap: bool = False) -> EncoderGGUF:
    """Check a Qwen3-VL language-model GGUF and its vision tower (`mmproj`: None = look next to it, a path = that
    file, False = text only; as `qwen_vl_gguf.open_encoder`); nothing is read but headers. The mmproj's DeepStack
    mergers must be as many as the language model takes (`qwen3vl.n_deepstack_layers`)."""
    stated = []  # the language model's DeepStack count, read before its vision tower is checked

    def text(f: gguf.GGUFFile):
        stated.append((f.path.name, f.metadata.get(DEEPSTACK_COUNT)))
        return text_layout(f)

    def vision(f: gguf.GGUFFile, width: int):
        plan, sizes = vision_layout(f, width)
        name, count = stated[0]
        if count is not None and count != len(sizes["deepstack_layers"]):
            raise CheckpointError(f"{f.path}: {len(sizes['deepstack_layers'])} DeepStack mergers, but {name} takes "
                                  f"{count} ({DEEPSTACK_COUNT}): the files are not one model")  # fmt: skip
        return plan, sizes

    return V1.open_encoder(path, mmproj, mmap, text_layout=text, vision_layout=vision, hint=MMPROJ_HINT,
                           floats=FLOATS)  # fmt: skip
