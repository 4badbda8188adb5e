"""Checkpoint formats of the Qwen-Image-2.1 DiT, as data, and the reader that turns them into weights.

Names: ComfyUI's `QwenImage21Transformer2DModel` (Comfy-Org/ComfyUI `comfy/ldm/qwen_image21/model.py` @
08f68f0919d2, checked): `img_in`, `txt_in.{text_norm,in_layer,out_layer}` (`text_norm` a zero-centred RMSNorm,
stored weight = scale - 1), `time_text_embed.timestep_embedder.linear_{1,2}`, one shared `modulation.1`,
`transformer_blocks.N.attn.{to_q,to_k,to_v,to_out.0,norm_q,norm_k}`, `transformer_blocks.N.img_mlp.{gate_up,out}`,
`norm_out.linear`, `proj_out`, no biases: our `DiT21`'s state dict, name for name. The SwiGLU is one `gate_up`
layer (gate rows first, ComfyUI's `fused_mlp`), or diffusers' `gate_layer` + `proj`, which ComfyUI also loads as
two layers (`fused_mlp` False when `transformer_blocks.0.img_mlp.gate_up.weight` is absent: its model_detection as
ported by a third-party Forge port; ComfyUI's own detection code at a 2.1 version is not in the code index).
diffusers' single-file converter (`convert_qwen_image21_transformer_checkpoint_to_diffusers`, 0.42.1) only strips
`model.diffusion_model.` and splits `gate_up`: no other conversion, so both layouts exist in the wild. Accepted:
* ComfyUI single files (`diffusion_models/qwen_image_2.1_{bf16,int8_convrot}`, `..._turbo_...`): no prefix or
  `model.diffusion_model.`; bf16 / fp16 / fp32, float8, and ComfyUI's quantised layers (`comfy_quant`,
  e.g. int8_convrot), kept packed;
* GGUF files with the same key names (`formats/gguf.py`), the SwiGLU fused or split (some third-party exports
  split it: halves of one quantised type are joined as stored, see `fuse_mlp`);
* diffusers folders: `transformer/` (or a repo folder holding it) with config.json (`_class_name`
  QwenImage21Transformer2DModel);
split plain-float halves are joined into `gate_up` in any layout; split quantised comfy_quant halves are refused by
name.
Sizes: explicit overrides, then config.json / a single file's `config` metadata ({"transformer": ...}),
then the shapes (the RoPE axes only for the real 128-channel heads).
A v1 Qwen-Image file (20B MMDiT) is refused naming its loader, and the v1 reader refuses these files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, open_checkpoint
from ..quant_gguf import GGUFQuant
from . import common, foreign, gguf
from .dit import PREFIXES, DiTWeights, gguf_config, guess_family, open_gguf, prefix_free_names, resolve

FAMILY = "Qwen-Image-2.1 DiT"
# keys (prefix-free) every 2.1 DiT has; `txt_in.text_norm.weight` is what diffusers' single-file loader keys off
SIGNATURE = ("txt_in.text_norm.weight", "img_in.weight", "modulation.1.weight", "proj_out.weight")
V1_SIGNATURE = ("txt_norm.weight", "img_in.weight", "txt_in.weight")  # a v1 Qwen-Image MMDiT
V1_ADVICE = "a Qwen-Image (v1, 20B MMDiT) DiT: load it with load_dit / the Qwen-Image diffusion-model loader"
CLASS_NAME = "QwenImage21Transformer2DModel"
V1_CLASS_NAME = "QwenImageTransformer2DModel"
# the diffusers folder's SwiGLU halves -> ComfyUI's fused layer (gate rows first)
SPLIT_MLP = (".img_mlp.gate_layer.weight", ".img_mlp.proj.weight")
FUSED_MLP = ".img_mlp.gate_up.weight"
# diffusers config.json field -> DiT21Config field (mlp_ratio and patch_size handled apart)
CONFIG_FIELDS = {
    "num_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "attention_head_dim": "head_dim",
    "context_in_dim": "text_dim",
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "axes_dims_rope": "rope_axes",
    "eps": "eps",
    "causal_condition": "causal_condition",
}
CONFIG_METADATA, CONFIG_SECTION = "config", "transformer"
GGUF_CONFIG_KEY = "qwen_image.config"
GGUF_ARCHITECTURES = ("qwen_image", "qwen_image21", None, "pig")  # keys tell 2.1 from v1 under each
REAL_HEAD_DIM, REAL_ROPE_AXES = 128, (16, 56, 56)


def config_fields(raw, where) -> dict:
    """DiT21Config fields from a diffusers transformer config, types checked; a v1 config is refused."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: a transformer config must be a JSON object")
    name = raw.get("_class_name")
    if name == V1_CLASS_NAME:
        raise CheckpointError(f"{where}: this is {V1_ADVICE}")
    if name is not None and name != CLASS_NAME:
        raise CheckpointError(f"{where}: this is not a {FAMILY} config ({name}; expected {CLASS_NAME})")
    if raw.get("patch_size", 1) != 1:
        raise CheckpointError(f"{where}: patch_size {raw['patch_size']!r}; the 2.1 DiT takes latents unpatched (1)")
    cfg = {}
    for theirs, ours in CONFIG_FIELDS.items():
        v = raw.get(theirs)
        if v is None:
            continue
        ok = {
            "rope_axes": isinstance(v, list) and len(v) == 3 and all(common.positive_int(a) for a in v),
            "causal_condition": isinstance(v, bool),
            "eps": isinstance(v, float) and v > 0,
        }.get(ours, common.positive_int(v))
        if not ok:
            raise CheckpointError(f"{where}: {theirs} is {v!r}, not a valid value")
        cfg[ours] = tuple(v) if ours == "rope_axes" else v
    ratio = raw.get("mlp_ratio")
    if ratio is not None:
        if not common.positive_int(ratio):
            raise CheckpointError(f"{where}: mlp_ratio is {ratio!r}, expected a positive integer")
        cfg["mlp_ratio"] = ratio  # turned into mlp_dim by infer_config (it needs the width)
    return cfg


def _metadata_config(metadata: Mapping[str, str], path) -> dict:  # {"transformer": <config.json>}
    return common.metadata_config(metadata, path, config_fields, CONFIG_METADATA, CONFIG_SECTION)


def infer_config(shapes: Mapping[str, tuple[int, ...]], known: Mapping, path) -> dict:
    """Every DiT21Config size: `known` ones first, the rest read off the (fused-naming) weight shapes."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{path}: not a complete {FAMILY} (no {key})")
        return shapes[key]

    known = dict(known)
    hidden, in_channels = shape("img_in.weight")
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks.")}
    head_dim = known.get("head_dim") or shape("transformer_blocks.0.attn.norm_q.weight")[0]
    if "num_heads" not in known and (head_dim <= 0 or hidden % head_dim):
        raise CheckpointError(f"{path}: width {hidden} does not split into heads of {head_dim} channels")
    ratio = known.pop("mlp_ratio", None)
    cfg = dict(
        num_layers=max(blocks) + 1 if blocks else 0,
        num_heads=hidden // head_dim if head_dim > 0 else 0,
        head_dim=head_dim,
        mlp_dim=shape("transformer_blocks.0" + FUSED_MLP)[0] // 2 if ratio is None else ratio * hidden,
        text_dim=shape("txt_in.in_layer.weight")[1],
        in_channels=in_channels,
        out_channels=shape("proj_out.weight")[0],
        timestep_dim=shape("time_text_embed.timestep_embedder.linear_1.weight")[1],
    )
    cfg.update(known)
    if "rope_axes" not in cfg:
        if cfg["head_dim"] != REAL_HEAD_DIM:
            raise CheckpointError(
                f"{path}: cannot tell the RoPE axes of {cfg['head_dim']}-channel heads from the weights (only the real "
                f"model's {REAL_HEAD_DIM} channels imply {REAL_ROPE_AXES}); put the diffusers config.json "
                "(axes_dims_rope) next to the weights, or pass rope_axes to load_dit21"
            )
        cfg["rope_axes"] = REAL_ROPE_AXES
    return cfg


def identify(path, keys, metadata: Mapping[str, str] | None = None) -> None:
    """Raise a clear CheckpointError unless the (prefix-free, fused or split) keys are a 2.1 DiT's."""
    other = foreign.identify(keys, metadata)
    if other is not None:
        raise CheckpointError(f"{path}: this is {other}")
    keyset = set(keys)
    if all(k in keyset for k in SIGNATURE):
        return
    if all(k in keyset for k in V1_SIGNATURE):
        raise CheckpointError(f"{path}: this is {V1_ADVICE}, not a {FAMILY}")
    what = guess_family(list(keys))
    missing = [k for k in SIGNATURE if k not in keyset]
    raise CheckpointError(
        f"{path}: this is not a {FAMILY} file"
        + (f"; it looks like {what}" if what else f": it lacks {', '.join(missing)} ({len(keyset)} tensors)")
    )


def fuse_mlp(path, tensors: dict[str, torch.Tensor], scales: Mapping, packed: dict) -> dict[str, torch.Tensor]:
    """diffusers' `gate_layer` / `proj` pairs as the one `gate_up` layer (gate rows first). Plain float pairs are
    concatenated; GGUF pairs of one quantised type are joined as stored (each row is whole blocks, so the rows of
    the two tensors stacked are exactly the fused tensor's blocks) and stay packed. Other quantised pairs are
    refused by name (ComfyUI loads them as two layers, `fused_mlp` False; this model has the fused one)."""
    gates = [k for k in tensors if k.endswith(SPLIT_MLP[0])]
    for gk in gates:
        uk = gk.removesuffix(SPLIT_MLP[0]) + SPLIT_MLP[1]
        if uk not in tensors or gk in scales or uk in scales:
            raise CheckpointError(f"{path}: {gk} has no plain float partner {uk} to join into the SwiGLU's gate_up")
        tensors[gk.removesuffix(SPLIT_MLP[0]) + FUSED_MLP] = torch.cat([tensors.pop(gk), tensors.pop(uk)], dim=0)
    for gk in [k for k in packed if k.endswith(SPLIT_MLP[0])]:
        uk = gk.removesuffix(SPLIT_MLP[0]) + SPLIT_MLP[1]
        joined = _join_gguf(packed[gk], packed.get(uk))
        if joined is None:
            break
        packed.pop(gk), packed.pop(uk)
        packed[gk.removesuffix(SPLIT_MLP[0]) + FUSED_MLP] = joined
    split_packed = [k for k in packed if k.endswith(SPLIT_MLP)]
    if split_packed:
        raise CheckpointError(
            f"{path}: {split_packed[0]} is quantised in diffusers' split SwiGLU layout, which this loader joins only "
            "for GGUF halves of one type with the same width; use the ComfyUI file of this format (fused gate_up)"
        )
    return tensors


def _join_gguf(gate, up):
    """The packed (data, GGUFQuant, extras) of gate rows then up rows, or None when they cannot be joined."""
    if up is None or not isinstance(gate[1], GGUFQuant) or not isinstance(up[1], GGUFQuant):
        return None
    (g, gq, _), (u, uq, _) = gate, up
    if gq.type != uq.type or len(gq.shape) != 2 or gq.shape[1:] != uq.shape[1:] or g.shape[1] != u.shape[1]:
        return None
    return torch.cat([g, u], dim=0), GGUFQuant(gq.type, (gq.shape[0] + uq.shape[0], gq.shape[1])), {}


def _fused_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes under the fused naming (for size inference on a diffusers folder)."""
    out = dict(shapes)
    for k in list(out):
        if k.endswith(SPLIT_MLP[0]):
            base = k.removesuffix(SPLIT_MLP[0])
            up = out.pop(base + SPLIT_MLP[1], (0, 0))
            gate = out.pop(k)
            out[base + FUSED_MLP] = (gate[0] + up[0], gate[1])
    return out


def read_dit21(path: str | os.PathLike, mmap: bool = False, overrides: Mapping | None = None) -> DiTWeights:
    """Open a 2.1 DiT checkpoint of any supported layout: fused-naming weights, scales, packed layers and every
    config size, checked before any weight is read (CheckpointError naming the file otherwise)."""
    path = resolve(path)
    if gguf.is_gguf(path):
        return read_gguf(path, mmap, overrides)
    config = common.read_config_json(path, config_fields)
    ckpt = open_checkpoint(path, mmap=mmap)
    prefix, names = prefix_free_names(ckpt.keys(), PREFIXES)
    identify(ckpt.path, list(names), ckpt.metadata)
    markers = common.read_markers(ckpt, names, lambda n: n.removeprefix(prefix))
    config = {**_metadata_config(ckpt.metadata, ckpt.path), **config, **(overrides or {})}
    config = infer_config(_fused_shapes(common.logical_shapes(ckpt, names, markers)), config, ckpt.path)
    tensors, scales, packed, storage = common.read_stored(ckpt, names, markers)
    tensors = fuse_mlp(ckpt.path, tensors, scales, packed)
    return DiTWeights(Path(ckpt.path), tensors, scales, config, storage, packed)


def read_gguf(path: Path, mmap: bool = False, overrides: Mapping | None = None) -> DiTWeights:
    """A GGUF 2.1 DiT: ComfyUI's key names, linear weights in a quantised type kept packed."""
    f = open_gguf(path, mmap, GGUF_ARCHITECTURES, f"a {FAMILY}")
    _, names = prefix_free_names(f.entries, PREFIXES)
    identify(path, list(names))
    config = _metadata_config(gguf_config(f, path, GGUF_CONFIG_KEY), path)
    shapes = _fused_shapes({n: f.shape(k) for n, k in names.items()})
    config = infer_config(shapes, {**config, **(overrides or {})}, path)
    tensors, packed = gguf.load_weights(f, names, lambda name, shape: name.endswith(".weight") and len(shape) == 2)
    tensors = fuse_mlp(path, tensors, {}, packed)
    return DiTWeights(Path(path), tensors, {}, config, gguf.describe(f, names.values()), packed)
