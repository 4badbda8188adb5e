"""Checkpoint format of the VideoX-Fun Qwen-Image ControlNet Union (alibaba-pai/Qwen-Image-2512-Fun-Controlnet-Union,
`Qwen-Image-2512-Fun-Controlnet-Union[-2602].safetensors`), as data, and its reader.

The file holds only the control branch (174 tensors in the published bf16 file, no prefix):
* `control_img_in` (Linear 132 -> hidden): the patchified control context, 33 latent channels x 2 x 2;
* `control_blocks.<k>` (k = 0..4): each a full Qwen-Image double-stream block under the DiT block's own key
  names (`img_mod.1`, `attn.to_q`, ..., `txt_mlp.net.2`), plus `after_proj` (Linear hidden -> hidden) and, on
  block 0 only, `before_proj` (Linear hidden -> hidden).
It has no input layers of its own: the DiT's `img_in`, `txt_norm`, `txt_in`, timestep embedding and RoPE are used.
Sizes follow from the shapes (hidden from `control_img_in`, head channels from `attn.norm_q`, MLP width from
`img_mlp.net.0.proj`, the block count from the `after_proj` keys); the DiT blocks the hints enter are not in
the file: (0, 12, 24, 36, 48) for the published one, or a `config` metadata entry
{"controlnet": {"control_layers": [...]}} (VideoX-Fun's `control_layers` argument) for other files.
Storage as for the DiT (`formats.dit`): bf16 / fp16 / fp32, plain or scaled float8, comfy_quant layers.
Files of other ControlNet families are named by `formats.controlnet.identify`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, open_checkpoint
from . import common
from . import controlnet as instantx
from .dit import prefix_free_names

PREFIXES = ("controlnet.", "model.diffusion_model.", "transformer.")
SIGNATURE = ("control_img_in.weight", "control_blocks.0.after_proj.weight")  # newer ComfyUI's detection keys
FIRST_BLOCK_ONLY = "control_blocks.0.before_proj.weight"
# the control context's latent channels before 2 x 2 patching, in order (VideoX-Fun QwenImageControlPipeline)
CONTEXT_LAYOUT = (("control latent", 16), ("1 - inpaint mask", 1), ("inpaint latent", 16))
CONTEXT_CHANNELS = sum(n for _, n in CONTEXT_LAYOUT)  # 33
INJECTION_LAYERS = (0, 12, 24, 36, 48)  # DiT blocks after which hint k is added (the published 5-block file)
CONFIG_METADATA, CONFIG_SECTION = "config", "controlnet"  # single-file metadata {"controlnet": {...}}
CONFIG_FIELDS = {"control_layers": "injection_layers"}  # VideoX-Fun's names -> FunConfig fields
BLOCK_KEY = re.compile(r"control_blocks\.(\d+)\.after_proj\.weight$")


@dataclass
class FunWeights:
    """What a Fun ControlNet checkpoint holds: prefix-free weights, float8 scales and sizes."""

    path: Path
    tensors: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    config: dict  # FunConfig fields
    storage: str = ""
    packed: dict = field(default_factory=dict)


def is_fun(keys) -> bool:
    """Whether (prefix-free) keys are a Fun Qwen-Image ControlNet's."""
    keyset = set(keys)
    return all(k in keyset for k in SIGNATURE)


def is_fun_file(path: str | os.PathLike) -> bool:
    """Whether a ControlNet file or folder is a Fun one (reads the header only): Fun or InstantX loader."""
    ckpt = open_checkpoint(Path(path), mmap=True)
    return is_fun(prefix_free_names(ckpt.keys(), PREFIXES)[1])


def identify(path, keys: list[str], metadata: Mapping[str, str] | None = None) -> None:
    """Raise a CheckpointError naming the file's family unless the keys are a Fun Qwen-Image ControlNet."""
    if is_fun(keys):
        if FIRST_BLOCK_ONLY not in set(keys):
            raise CheckpointError(f"{path}: a Fun Qwen-Image ControlNet without {FIRST_BLOCK_ONLY}; the file is cut")
        return
    instantx.identify(path, keys, metadata)  # names the other families (raises), or passes an InstantX file
    raise CheckpointError(
        f"{path}: this is an InstantX Qwen-Image ControlNet, not a Fun one: load it with load_controlnet"
    )


def _fields(raw, where) -> dict:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: a Fun ControlNet config must be a JSON object")
    out = {}
    for key, value in raw.items():
        if key == "control_layers":
            if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value) or not value:
                raise CheckpointError(f"{where}: control_layers must be a list of block indices, got {value!r}")
            out["injection_layers"] = tuple(value)
    return out


def sizes_from_shapes(shapes: Mapping[str, tuple[int, ...]], path) -> dict:
    """FunConfig fields the shapes tell: hidden width, heads, head channels, MLP width, block count."""
    hidden, width = shapes["control_img_in.weight"]
    if width != CONTEXT_CHANNELS * 4:
        raise CheckpointError(
            f"{path}: control_img_in takes {width} features; the Fun Qwen-Image ControlNet takes "
            f"{CONTEXT_CHANNELS * 4} ({' | '.join(f'{n} {what}' for what, n in CONTEXT_LAYOUT)}, 2 x 2 patched)"
        )
    blocks = sorted(int(m.group(1)) for k in shapes if (m := BLOCK_KEY.match(k)))
    if blocks != list(range(len(blocks))):
        raise CheckpointError(f"{path}: control_blocks are not numbered 0..n-1 (found {blocks})")
    head_dim = shapes.get("control_blocks.0.attn.norm_q.weight", (0,))[0]
    if head_dim <= 0 or hidden % head_dim:
        raise CheckpointError(f"{path}: control_blocks.0.attn.norm_q gives no head size dividing {hidden}")
    mlp = shapes.get("control_blocks.0.img_mlp.net.0.proj.weight", (0,))[0]
    return dict(num_blocks=len(blocks), num_heads=hidden // head_dim, head_dim=head_dim, mlp_dim=mlp)


def read_fun_controlnet(path: str | os.PathLike, mmap: bool = False, overrides: Mapping | None = None) -> FunWeights:
    """Open a Fun ControlNet single file: prefix-free weights, scales and sizes (FunConfig fields).

    Raises CheckpointError naming the file for other families (InstantX, Flux / SDXL ControlNets, DiffSynth
    patches, a DiT), a control input of another width, and a block count its injection layers do not fit.
    """
    ckpt = open_checkpoint(Path(path), mmap=mmap)
    prefix, names = prefix_free_names(ckpt.keys(), PREFIXES)
    identify(ckpt.path, list(names), ckpt.metadata)
    markers = common.read_markers(ckpt, names, lambda n: n.removeprefix(prefix))
    shapes = common.logical_shapes(ckpt, names, markers)
    config = {
        "injection_layers": INJECTION_LAYERS,
        **sizes_from_shapes(shapes, ckpt.path),
        **common.metadata_config(ckpt.metadata, ckpt.path, _fields, CONFIG_METADATA, CONFIG_SECTION),
        **(overrides or {}),
    }
    if len(config["injection_layers"]) != config["num_blocks"]:
        raise CheckpointError(
            f"{ckpt.path}: {config['num_blocks']} control blocks but {len(config['injection_layers'])} injection "
            f"layers {config['injection_layers']}; give control_layers in the `config` metadata"
        )
    tensors, scales, packed, storage = common.read_stored(ckpt, names, markers)
    return FunWeights(Path(ckpt.path), tensors, scales, config, storage, packed)
