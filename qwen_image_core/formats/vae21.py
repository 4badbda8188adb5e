"""The Qwen-Image-2.1 VAE's checkpoint layout (`AutoencoderKLQwenImage21` names), detection, and `load_vae21`.

Layouts read: the diffusers `vae/` folder of Qwen/Qwen-Image-2.1 (`config.json` with `_class_name`
`AutoencoderKLQwenImage21` + `diffusion_pytorch_model.safetensors`, or a repo folder holding `vae/`), and single
files with the same tensor names (optionally under `vae.` / `first_stage_model.`), as the Comfy-Org
`qwen_image_2.1_vae_bf16.safetensors` is taken to be (its key names were not available to check).
`layout(cfg)` lists every tensor of the file with its shape: the 2D image network's tensors (residual and output
norm gains [C, 1, 1, 1], attention norm gains [C, 1, 1]) plus the temporal `time_conv` 1x1 convs of the stages
that fold time, which a single frame never uses: they must be present and are dropped after the check
(`formats.vae.image_weights`, v1's: gains to [C, 1, 1], conv weights channels-last).

Detection both ways: this reader names the v1 VAE (Wan 2.1 or diffusers names, 16 channels) and refuses it;
the v1 reader (`formats.vae.detect`) names and refuses this one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, open_checkpoint
from ..qwen21.vae import ImageVAE21, VAE21Config
from .common import assign_weights, describe_mismatch
from .vae import DIFFUSERS_MARKER, PREFIXES, WAN22_MARKER, WAN_MARKER, image_weights

WHAT = "Qwen-Image-2.1 VAE"
MARKER = "encoder.down_blocks.0.resnets.0.conv1.weight"  # residual down blocks: the 2.1 (Wan 2.2-style) VAE
CLASS_NAME = "AutoencoderKLQwenImage21"  # diffusers config.json `_class_name`
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def detect(keys, path) -> str:
    """The prefix of a 2.1 VAE's keys; CheckpointError naming what the file is otherwise."""
    keys = set(keys)
    for prefix in ("", *PREFIXES):
        if prefix + MARKER in keys:
            return prefix
        if prefix + WAN_MARKER in keys or prefix + DIFFUSERS_MARKER in keys:
            raise CheckpointError(
                f"{path}: this is the Qwen-Image v1 VAE (16 channels, 8x; use load_vae), not the {WHAT}"
            )
        if prefix + WAN22_MARKER in keys:
            raise CheckpointError(
                f"{path}: a VAE in ComfyUI's Wan 2.2 naming; this reader takes the diffusers names of "
                f"{CLASS_NAME} (a Qwen/Qwen-Image-2.1 vae/ folder)"
            )
    raise CheckpointError(f"{path}: not a {WHAT} file (no {MARKER!r})")


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
    """Open a 2.1 VAE file or folder: (config, 2D image weights), every check done."""
    path = Path(path)
    if path.is_dir() and (path / "vae").is_dir():
        path = path / "vae"
    ckpt = open_checkpoint(path)
    prefix = detect(ckpt.keys(), ckpt.path)
    names = {k: k[len(prefix) :] for k in ckpt if k.startswith(prefix)}
    shapes = {d: ckpt.shape(k) for k, d in names.items()}
    cfg = infer_config(shapes, ckpt.path, _latent_stats(path if path.is_dir() else path.parent))
    problem = describe_mismatch(ckpt.path, WHAT, layout(cfg), shapes)
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
