"""Checkpoint formats of the InstantX Qwen-Image ControlNets, as data, and their reader.

An InstantX ControlNet (Union: canny / soft-edge / depth / pose; Inpainting) is the DiT's input layers and first
blocks under the DiT's own key names (no `norm_out`, no `proj_out`), plus one `controlnet_blocks.<i>` Linear
(hidden -> hidden) per block and `controlnet_x_embedder` (the patchified control latent -> hidden). The kind
follows from `controlnet_x_embedder`'s input width: the DiT's 64 (Union), or 64 + 4 (Inpainting: a 1-channel
mask, 2 x 2 patched, after the masked image's latent).

Accepted layouts (one naming for all):
* ComfyUI single files (Comfy-Org/Qwen-Image-InstantX-ControlNets): no prefix, bf16 / fp16 / fp32, plain or
  scaled float8 and comfy_quant layers as for the DiT (`formats.dit`), sizes from the shapes (the real
  128-channel heads) or a `config` metadata entry {"controlnet": <config.json>};
* diffusers folders of `QwenImageControlNetModel` (config.json + `diffusion_pytorch_model*.safetensors`).
ComfyUI's other "model patches" (DiffSynth blockwise ControlNets) and ControlNets of other models are named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, open_checkpoint
from . import common, foreign
from .dit import LATENT_CHANNELS, config_fields, infer_config, prefix_free_names

PREFIXES = ("controlnet.", "model.diffusion_model.")
SIGNATURE = ("controlnet_x_embedder.weight", "controlnet_blocks.0.weight", "img_in.weight", "txt_in.weight")
CLASS_NAME = "QwenImageControlNetModel"  # `_class_name` of a diffusers ControlNet config.json
CONFIG_METADATA, CONFIG_SECTION = "config", "controlnet"  # single-file metadata {"controlnet": <config.json>}
# extra control channels (after the 64 of the patchified latent) -> the kind of InstantX ControlNet
KINDS = {0: "union", 4: "inpaint"}
# ControlNets and patches of other models, by one characteristic key (prefix-free), checked in order
OTHER_CONTROLS = (
    ("control_img_in.weight", "a Fun Qwen-Image ControlNet Union (VideoX-Fun, 2512): load it with "
     "controlnet_fun.load_fun_controlnet (the Load Qwen-Image ControlNet node reads both kinds)"),
    ("controlnet_blocks.0.y_rms.weight", "a DiffSynth blockwise ControlNet (a model patch): load it with "
     "ModelPatchLoader + QwenImageDiffsynthControlnet"),
    ("controlnet_single_blocks.0.weight", "a Flux ControlNet (diffusers layout)"),
    ("x_embedder.weight", "a Flux ControlNet"),
    ("controlnet_cond_embedding.conv_in.weight", "a Stable Diffusion / SDXL ControlNet (diffusers layout)"),
    ("input_hint_block.0.weight", "a Stable Diffusion / SDXL ControlNet (original layout)"),
    ("zero_convs.0.0.weight", "a Stable Diffusion / SDXL ControlNet (original layout)"),
    ("lora_controlnet", "a Control-LoRA"),
    ("controlnet_x_embedder.weight", "a ControlNet of another model (not Qwen-Image's InstantX layout)"),
)  # fmt: skip


@dataclass
class ControlNetWeights:
    """What a ControlNet checkpoint holds: prefix-free weights, float8 scales, sizes and the kind."""

    path: Path
    tensors: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    config: dict  # MMDiTConfig fields of the ControlNet's own stack (num_layers: its blocks, e.g. 5)
    extra_channels: int  # control channels after the 64 latent ones: 0 Union, 4 Inpainting
    storage: str = ""
    packed: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return KINDS[self.extra_channels]


def identify(path, keys: list[str], metadata: Mapping[str, str] | None = None) -> None:
    """Raise a CheckpointError naming the file's family unless the keys are an InstantX Qwen-Image ControlNet."""
    other = foreign.identify(keys, metadata)
    if other is not None:
        raise CheckpointError(f"{path}: this is {other}")
    keyset = set(keys)
    if all(k in keyset for k in SIGNATURE) and "txt_norm.weight" in keyset:
        if "proj_out.weight" in keyset:
            raise CheckpointError(f"{path}: this holds a whole DiT's output layers; it is not an InstantX ControlNet")
        return
    if all(k in keyset for k in ("txt_norm.weight", "img_in.weight", "proj_out.weight")):
        raise CheckpointError(
            f"{path}: this is a Qwen-Image diffusion model (DiT), not a ControlNet: load it with the diffusion "
            "model loader"
        )
    for key, what in OTHER_CONTROLS:
        if key in keyset or any(k.endswith("." + key) for k in keys):
            raise CheckpointError(f"{path}: this is {what}, not an InstantX Qwen-Image ControlNet")
    missing = [k for k in SIGNATURE if k not in keyset]
    raise CheckpointError(
        f"{path}: this is not an InstantX Qwen-Image ControlNet: it lacks {', '.join(missing)} "
        f"({len(keys)} tensors, e.g. {', '.join(keys[:3])})"
    )


def _fields(raw, where) -> dict:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: a ControlNet config must be a JSON object")
    name = raw.get("_class_name")
    if name is not None and name != CLASS_NAME:
        raise CheckpointError(f"{where}: this is not a Qwen-Image ControlNet config ({name}; expected {CLASS_NAME})")
    return config_fields({k: v for k, v in raw.items() if k != "_class_name"}, where)


def _metadata_config(metadata: Mapping[str, str], path) -> dict:
    return common.metadata_config(metadata, path, _fields, CONFIG_METADATA, CONFIG_SECTION)


def read_controlnet(path: str | os.PathLike, mmap: bool = False, overrides: Mapping | None = None) -> ControlNetWeights:
    """Open an InstantX ControlNet file or diffusers folder: prefix-free weights, scales, sizes and kind.

    Raises CheckpointError naming the file for other families (a DiT, Flux / SDXL ControlNets, DiffSynth
    patches), unknown control widths and sizes that cannot be known.
    """
    path = Path(path)
    config = common.read_config_json(path, _fields)
    ckpt = open_checkpoint(path, mmap=mmap)
    prefix, names = prefix_free_names(ckpt.keys(), PREFIXES)
    identify(ckpt.path, list(names), ckpt.metadata)
    markers = common.read_markers(ckpt, names, lambda n: n.removeprefix(prefix))
    shapes = common.logical_shapes(ckpt, names, markers)
    known = {**_metadata_config(ckpt.metadata, ckpt.path), **config, **(overrides or {})}
    known.setdefault("out_channels", LATENT_CHANNELS)  # a ControlNet has no proj_out to read it from
    hidden, in_channels = shapes["img_in.weight"]  # the DiT's output layer it lacks would be in_channels wide
    config = infer_config({**shapes, "proj_out.weight": (in_channels, hidden)}, known, ckpt.path)
    width = shapes["controlnet_x_embedder.weight"][1]
    extra = width - config["in_channels"]
    if extra not in KINDS:
        raise CheckpointError(
            f"{ckpt.path}: controlnet_x_embedder takes {width} channels; an InstantX Qwen-Image ControlNet takes "
            f"{config['in_channels']} (Union) or {config['in_channels'] + 4} (Inpainting)"
        )
    tensors, scales, packed, storage = common.read_stored(ckpt, names, markers)
    return ControlNetWeights(Path(ckpt.path), tensors, scales, config, extra, storage, packed)
