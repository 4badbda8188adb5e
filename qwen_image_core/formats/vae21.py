"""The Qwen-Image-2.1 VAE's checkpoint layouts (`AutoencoderKLQwenImage21` names), detection, and `load_vae21`.

Layouts read:
* the diffusers `vae/` folder of Qwen/Qwen-Image-2.1 (`config.json` with `_class_name` `AutoencoderKLQwenImage21` +
  `diffusion_pytorch_model.safetensors`, or a repo folder holding `vae/`), and single files with those names;
* Comfy-Org's `vae/qwen_image_2.1_vae_bf16.safetensors`: ComfyUI's Wan 2.2-style module names (`encoder.conv1`,
  `encoder.downsamples.I.downsamples.J.residual.N`, `middle`, `head`, top-level `conv1` / `conv2`) with 5-D
  "causal 3D" conv weights one frame deep ([out, in, 1, k, k]): the state dict of ComfyUI's
  `comfy.ldm.wan.vae2_2.WanVAE` with dim 96, dec_dim 144, z_dim 64, dim_mult [1, 2, 4, 8, 8], num_res_blocks 2,
  temperal_downsample [False, True, True, True], image_channels 4, patch_size 1, temporal_kernel 1. Checked: that
  module and its image_channels / patch_size / temporal_kernel arguments (Comfy-Org/ComfyUI `comfy/ldm/wan/vae2_2.py`
  @ 32671a6740a8, `vae.py` @ dcbf1c1db50a), and its names for these stages (ComfyUI 0.3.75's WanVAE, built in
  `tests/test_vae21.py`). Reported, not checked (the newer `comfy/sd.py` with its Qwen-Image-2.1 branch is not in the
  code index): those constructor arguments as that branch passes them, the Wan 2.2 key
  `decoder.upsamples.0.upsamples.0.residual.2.weight` in the real file, and `encoder.conv1.weight` [96, 4, 1, 3, 3]
  there (third-party code that loads the real file). `comfy_to_diffusers` renames to the diffusers names; depth-1 conv
  weights are read as 2D, deeper ones refused.
Either may sit under `vae.` / `first_stage_model.`.
`layout(cfg)` lists every tensor of a diffusers-named file with its shape: the 2D image network's tensors (residual
and output norm gains [C, 1, 1, 1], attention norm gains [C, 1, 1]) plus the temporal `time_conv` 1x1 convs of the
stages that fold time, which a single frame never uses: they must be present and are dropped after the check
(`formats.vae.image_weights`, v1's: gains to [C, 1, 1], conv weights channels-last).

Detection both ways: this reader names the v1 VAE (Wan 2.1 or diffusers names, 16 channels) and Wan 2.2's own VAE
(4 stages, 48 channels) and refuses them; the v1 reader (`formats.vae.detect`) names and refuses this one in either
naming.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, open_checkpoint
from ..qwen21.vae import ImageVAE21, VAE21Config
from .common import assign_weights, describe_mismatch
from .vae import (
    DIFFUSERS_MARKER,
    MIDDLE_RULES,
    PREFIXES,
    WAN22_MARKER,
    WAN_MARKER,
    image_weights,
    residual_to_diffusers,
    top_level_to_diffusers,
)

WHAT = "Qwen-Image-2.1 VAE"
MARKER = "encoder.down_blocks.0.resnets.0.conv1.weight"  # residual down blocks: the 2.1 (Wan 2.2-style) VAE
# ComfyUI naming: a fifth encoder stage of residual down blocks, which Wan 2.2's own (4-stage) VAE does not have
COMFY_MARKER = "encoder.downsamples.4.downsamples.0.residual.0.gamma"
CLASS_NAME = "AutoencoderKLQwenImage21"  # diffusers config.json `_class_name`
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ComfyUI (Wan 2.2-style) name -> diffusers name: the top level, middle and residual parts as v1's Wan names
# (`formats.vae`), and these stage rules. The residual blocks of a stage come first in ComfyUI's nested
# `downsamples` / `upsamples` Sequentials, with the same index as diffusers' `resnets`; the stage's Resample
# (`resample.1`, `time_conv`) is its last entry. The shortcuts (AvgDown3D / DupUp3D) hold no tensors.
STAGE_RULES = tuple((re.compile(p), s) for p, s in (
    (r"^encoder\.downsamples\.(\d+)\.downsamples\.\d+\.(resample|time_conv)\.",
     r"encoder.down_blocks.\1.downsampler.\2."),
    (r"^encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^decoder\.upsamples\.(\d+)\.upsamples\.\d+\.(resample|time_conv)\.",
     r"decoder.up_blocks.\1.upsampler.\2."),
    (r"^decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.", r"decoder.up_blocks.\1.resnets.\2."),
))  # fmt: skip


def comfy_to_diffusers(key: str) -> str:
    """One ComfyUI-named 2.1 VAE key (prefix removed) in diffusers naming."""
    top = top_level_to_diffusers(key)
    if top is not None:
        return top
    for pattern, sub in (*MIDDLE_RULES, *STAGE_RULES):
        key = pattern.sub(sub, key)
    return residual_to_diffusers(key)


def layout(cfg: VAE21Config) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor a 2.1 VAE file holds for `cfg`."""
    with torch.device("meta"):
        model = ImageVAE21(cfg)
    rows = {}
    for k, t in model.state_dict().items():
        attention_norm = ".attentions." in k
        rows[k] = (*t.shape, 1) if k.endswith(".gamma") and not attention_norm else tuple(t.shape)
    last = len(cfg.dim_mult) - 1
    for i, temporal in enumerate(cfg.temporal_downsample):  # the temporal 1x1 convs (unused on one frame)
        if temporal and i < last:
            d = cfg.encoder_dim * cfg.dim_mult[i]
            rows[f"encoder.down_blocks.{i}.downsampler.time_conv.weight"] = (d, d, 1, 1)
            rows[f"encoder.down_blocks.{i}.downsampler.time_conv.bias"] = (d,)
    for i, temporal in enumerate(cfg.temporal_downsample[::-1]):
        if temporal and i < last:
            d = cfg.decoder_dim * cfg.dim_mult[::-1][i]  # up block i's output width
            rows[f"decoder.up_blocks.{i}.upsampler.time_conv.weight"] = (2 * d, d, 1, 1)
            rows[f"decoder.up_blocks.{i}.upsampler.time_conv.bias"] = (2 * d,)
    return rows


def detect(keys, path) -> tuple[str, str]:
    """(naming, prefix) of a 2.1 VAE's keys, naming "diffusers" or "comfy"; CheckpointError naming what the file is
    otherwise."""
    keys = set(keys)
    for prefix in ("", *PREFIXES):
        if prefix + MARKER in keys:
            return "diffusers", prefix
        if prefix + COMFY_MARKER in keys:  # before the Wan markers: the ComfyUI-named 2.1 file has them too
            return "comfy", prefix
        if prefix + WAN22_MARKER in keys:
            raise CheckpointError(
                f"{path}: this is Wan 2.2's own VAE (4 stages, 48 latent channels; ComfyUI's Wan 2.2 naming), not the "
                f"{WHAT} (5 stages, 64 channels)"
            )
        if prefix + WAN_MARKER in keys or prefix + DIFFUSERS_MARKER in keys:
            raise CheckpointError(
                f"{path}: this is the Qwen-Image v1 VAE (16 channels, 8x; use load_vae), not the {WHAT}"
            )
    raise CheckpointError(f"{path}: not a {WHAT} file (neither {MARKER!r} nor {COMFY_MARKER!r})")


def file_names(keys, naming: str, prefix: str, path) -> dict[str, str]:
    """{file key: diffusers name} of the VAE's keys under `prefix`; a name reached twice is a CheckpointError."""
    out, seen = {}, {}
    for k in keys:
        if not k.startswith(prefix):
            continue
        name = k[len(prefix) :]
        name = comfy_to_diffusers(name) if naming == "comfy" else name
        if name in seen:
            raise CheckpointError(f"{path}: {seen[name]} and {k} are both {name}")
        out[k], seen[name] = name, k
    return out


def stored_shape(shape: tuple[int, ...], key: str, naming: str, path) -> tuple[int, ...]:
    """The diffusers shape of a stored tensor: ComfyUI's 5-D conv weights must be one frame deep and read as 2D."""
    if naming != "comfy" or len(shape) != 5:
        return tuple(shape)
    if shape[2] != 1:
        raise CheckpointError(
            f"{path}: {key} is {list(shape)}, a convolution {shape[2]} frames deep; the {WHAT}'s are 1 deep "
            "(ComfyUI temporal_kernel 1): this is a video VAE"
        )
    return (shape[0], shape[1], *shape[3:])


def _count(shapes, prefix: str) -> int:
    found = {int(k[len(prefix) :].split(".")[0]) for k in shapes if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def infer_config(shapes, path, stats: dict) -> VAE21Config:
    """A VAE21Config read off the file's shapes (latent statistics from the folder's config.json, if any)."""
    try:
        enc, channels = shapes["encoder.conv_in.weight"][:2]
        stages = _count(shapes, "encoder.down_blocks.")
        widths = [shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(stages)]
        cfg = VAE21Config(
            encoder_dim=enc,
            decoder_dim=shapes["decoder.conv_out.weight"][1],
            z_dim=shapes["post_quant_conv.weight"][0],
            dim_mult=tuple(w // enc for w in widths),
            num_res_blocks=_count(shapes, "encoder.down_blocks.0.resnets."),
            temporal_downsample=tuple(
                f"encoder.down_blocks.{i}.downsampler.time_conv.weight" in shapes for i in range(stages - 1)
            ),
            image_channels=channels,
            **stats,
        )
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(
            f"{path}: incomplete or inconsistent {WHAT}, cannot read its configuration ({e})"
        ) from None
    if any(w % enc for w in widths):
        raise CheckpointError(f"{path}: stage widths {widths} are not multiples of the first stage's {enc}")
    return cfg


def _latent_stats(folder: Path) -> dict:
    """latents_mean / latents_std from a diffusers AutoencoderKLQwenImage21 config.json beside the weights."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cfg, dict) or cfg.get("_class_name") != CLASS_NAME:
        return {}
    return {k: tuple(float(v) for v in cfg[k]) for k in ("latents_mean", "latents_std") if cfg.get(k)}


def read_vae21(path: str | os.PathLike) -> tuple[VAE21Config, dict[str, torch.Tensor]]:
    """Open a 2.1 VAE file or folder (either naming): (config, 2D image weights under diffusers names), every check
    done."""
    path = Path(path)
    if path.is_dir() and (path / "vae").is_dir():
        path = path / "vae"
    ckpt = open_checkpoint(path)
    naming, prefix = detect(ckpt.keys(), ckpt.path)
    names = file_names(ckpt.keys(), naming, prefix, ckpt.path)
    shapes = {d: stored_shape(ckpt.shape(k), k, naming, ckpt.path) for k, d in names.items()}
    cfg = infer_config(shapes, ckpt.path, _latent_stats(path if path.is_dir() else path.parent))
    what = WHAT if naming == "diffusers" else f"{WHAT} (ComfyUI's names, listed as their diffusers names)"
    problem = describe_mismatch(ckpt.path, what, layout(cfg), shapes)
    if problem:
        raise CheckpointError(problem)
    bad = {ckpt.dtype(k) for k in names} - set(FLOAT_DTYPES)
    if bad:
        raise CheckpointError(f"{ckpt.path}: VAE weights must be float32, float16 or bfloat16, found {bad}")
    return cfg, image_weights({d: ckpt[k] for k, d in names.items()})


def load_vae21(path: str | os.PathLike) -> ImageVAE21:
    """The 2.1 image VAE from a diffusers folder or a single file, built on the meta device and filled by
    assignment (weights keep the file's dtype)."""
    cfg, weights = read_vae21(path)
    with torch.device("meta"):
        vae = ImageVAE21(cfg)
    return assign_weights(vae, weights, {}, path, WHAT).eval()
