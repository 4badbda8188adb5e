"""The Qwen-Image VAE's checkpoint layouts: Wan/ComfyUI and diffusers names, detection, and `load_vae`.

Two layouts hold the same 194 tensors of the causal 3D network (facts sheet §2.6):
* ComfyUI's `qwen_image_vae.safetensors` keeps the original Wan 2.1 names (`encoder.downsamples.3.residual.2`);
* the diffusers `vae/` folder uses `AutoencoderKLQwenImage` names (`encoder.down_blocks.3.conv1`).
`layout(cfg)` lists every tensor under both names with its 3D shape; it is the rename table, the key-set
check and the writer's template at once. Our image VAE uses the diffusers names for its modules, and
`image_weights` slices the 5D convolution weights to the 2D ones a single frame actually uses (§2.3).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, CheckpointError, open_checkpoint
from ..vae import ImageVAE, VAEConfig
from .common import assign_weights, describe_mismatch

# prefixes a VAE may carry inside a bigger file (all-in-one checkpoints, some exports); only its keys are read
PREFIXES = ("first_stage_model.", "vae.")
# one key that identifies each naming (after the prefix is stripped)
WAN_MARKER = "decoder.middle.0.residual.0.gamma"
DIFFUSERS_MARKER = "decoder.mid_block.resnets.0.norm1.gamma"
WAN22_MARKER = "decoder.upsamples.0.upsamples.0.residual.2.weight"  # Wan 2.2's 48-channel VAE
QWEN21_MARKER = "encoder.down_blocks.0.resnets.0.conv1.weight"  # Qwen-Image-2.1's VAE (diffusers names)
QWEN21_COMFY_MARKER = "encoder.downsamples.4.downsamples.0.residual.0.gamma"  # the same in ComfyUI's names (5 stages)

# residual block parts: Wan's nn.Sequential indices -> diffusers' attribute names
RESIDUAL_PARTS = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                  "conv_shortcut": "shortcut"}  # fmt: skip
# top-level pieces: diffusers -> Wan
TOP_LEVEL = {"quant_conv": "conv1", "post_quant_conv": "conv2",
             "encoder.conv_in": "encoder.conv1", "decoder.conv_in": "decoder.conv1",
             "encoder.norm_out": "encoder.head.0", "encoder.conv_out": "encoder.head.2",
             "decoder.norm_out": "decoder.head.0", "decoder.conv_out": "decoder.head.2"}  # fmt: skip
# keys that tell other model families apart, for a clear "this is not ..." error
FOREIGN = (
    (".lora_down.weight", "a LoRA"),
    (".lora_A.weight", "a LoRA"),
    ("input_blocks.0.0.weight", "a Stable Diffusion UNet (SD1.x / SDXL)"),
    ("blocks.0.self_attn.q.weight", "a Wan video diffusion model"),
    ("double_blocks.0.img_attn.qkv.weight", "a Flux diffusion model"),
    ("transformer_blocks.0.img_mod.1.weight", "a Qwen-Image diffusion model (DiT)"),
    ("img_in.weight", "a diffusion model (DiT)"),
    ("model.layers.0.self_attn.q_proj.weight", "a text encoder"),
    ("model.language_model.layers.0.self_attn.q_proj.weight", "a text encoder"),
    ("encoder.down.0.block.0.conv1.weight", "a 2D image VAE of the SD / SDXL / Flux kind"),
    ("encoder.down_blocks.0.resnets.0.conv1.weight", "a 2D image VAE of the SD / SDXL / Flux kind (diffusers)"),
)


def layout(cfg: VAEConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """Every tensor of the 3D checkpoint for `cfg`: (diffusers name, Wan name, shape)."""
    rows: list[tuple[str, str, tuple[int, ...]]] = []

    def conv3d(d, w, cout, cin, k):  # causal 3D conv, cubic kernel k
        rows.extend([(f"{d}.weight", f"{w}.weight", (cout, cin, k, k, k)), (f"{d}.bias", f"{w}.bias", (cout,))])

    def param(d, w, shape):
        rows.append((d, w, shape))

    def residual(d, w, cin, cout):
        wan = {k: f"{w}.{v}" for k, v in RESIDUAL_PARTS.items()}
        param(f"{d}.norm1.gamma", f"{wan['norm1']}.gamma", (cin, 1, 1, 1))
        conv3d(f"{d}.conv1", wan["conv1"], cout, cin, 3)
        param(f"{d}.norm2.gamma", f"{wan['norm2']}.gamma", (cout, 1, 1, 1))
        conv3d(f"{d}.conv2", wan["conv2"], cout, cout, 3)
        if cin != cout:
            conv3d(f"{d}.conv_shortcut", wan["conv_shortcut"], cout, cin, 1)

    def resample(d, w, cin, cout, temporal_cin, temporal_cout):
        param(f"{d}.resample.1.weight", f"{w}.resample.1.weight", (cout, cin, 3, 3))
        param(f"{d}.resample.1.bias", f"{w}.resample.1.bias", (cout,))
        if temporal_cout:  # video-only temporal conv: kernel (3, 1, 1)
            param(f"{d}.time_conv.weight", f"{w}.time_conv.weight", (temporal_cout, temporal_cin, 3, 1, 1))
            param(f"{d}.time_conv.bias", f"{w}.time_conv.bias", (temporal_cout,))

    def middle(side, c):
        residual(f"{side}.mid_block.resnets.0", f"{side}.middle.0", c, c)
        param(f"{side}.mid_block.attentions.0.norm.gamma", f"{side}.middle.1.norm.gamma", (c, 1, 1))
        for part, cout in (("to_qkv", 3 * c), ("proj", c)):
            param(f"{side}.mid_block.attentions.0.{part}.weight", f"{side}.middle.1.{part}.weight", (cout, c, 1, 1))
            param(f"{side}.mid_block.attentions.0.{part}.bias", f"{side}.middle.1.{part}.bias", (cout,))
        residual(f"{side}.mid_block.resnets.1", f"{side}.middle.2", c, c)

    top = TOP_LEVEL
    r, z, stages = cfg.num_res_blocks, cfg.z_dim, len(cfg.dim_mult)
    enc = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]  # 96, 96, 192, 384, 384
    conv3d("encoder.conv_in", top["encoder.conv_in"], enc[0], cfg.image_channels, 3)
    n = 0
    for i in range(stages):
        cin = enc[i]
        for _ in range(r):
            residual(f"encoder.down_blocks.{n}", f"encoder.downsamples.{n}", cin, enc[i + 1])
            cin, n = enc[i + 1], n + 1
        if i < stages - 1:
            c, temporal = enc[i + 1], cfg.temporal_downsample[i]
            resample(f"encoder.down_blocks.{n}", f"encoder.downsamples.{n}", c, c, c, c if temporal else 0)
            n += 1
    middle("encoder", enc[-1])
    param("encoder.norm_out.gamma", f"{top['encoder.norm_out']}.gamma", (enc[-1], 1, 1, 1))
    conv3d("encoder.conv_out", top["encoder.conv_out"], 2 * z, enc[-1], 3)
    conv3d("quant_conv", top["quant_conv"], 2 * z, 2 * z, 1)
    conv3d("post_quant_conv", top["post_quant_conv"], z, z, 1)

    dec = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]  # 384, 384, 384, 192, 96
    conv3d("decoder.conv_in", top["decoder.conv_in"], dec[0], z, 3)
    middle("decoder", dec[0])
    n = 0
    for i in range(stages):
        cin = dec[i] if i == 0 else dec[i] // 2  # each upsampler halves the channels
        for j in range(r + 1):
            residual(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.upsamples.{n}", cin, dec[i + 1])
            cin, n = dec[i + 1], n + 1
        if i < stages - 1:
            c, temporal = dec[i + 1], cfg.temporal_downsample[::-1][i]
            resample(
                f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.upsamples.{n}", c, c // 2, c, 2 * c if temporal else 0
            )
            n += 1
    param("decoder.norm_out.gamma", f"{top['decoder.norm_out']}.gamma", (dec[-1], 1, 1, 1))
    conv3d("decoder.conv_out", top["decoder.conv_out"], cfg.image_channels, dec[-1], 3)
    return rows


def image_weights(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The 2D image network's weights from the 3D checkpoint's (diffusers names); facts sheet §2.3.

    A causal k×k×k conv pads time by 2·(k//2) zero frames in front, so a single frame only meets the last
    temporal tap: weight[:, :, -1]. 1×1×1 convs keep tap 0 (the same, the last). `time_conv` weights act
    only between frames and are dropped. Norm gains become [C, 1, 1]. Everything is copied out (about a
    third of the file), so the 3D tensors read from the file are released after loading; conv weights in channels-last
    order, the layout the image VAE computes in (on CPU ~1.5x faster and about half the activation
    memory of NCHW).
    """
    out = {}
    for k, t in tensors.items():
        if ".time_conv." in k:
            continue
        if k.endswith(".gamma"):
            out[k] = t.reshape(t.shape[0], 1, 1).clone()
        elif t.dim() >= 4:
            out[k] = (t[:, :, -1] if t.dim() == 5 else t).clone(memory_format=torch.channels_last)
        else:
            out[k] = t.clone()
    return out


# --- detection and config inference ---------------------------------------------------------------


def detect(keys, path) -> tuple[str, str]:
    """(naming, prefix) with naming "wan" or "diffusers"; CheckpointError for any other file."""
    keys = set(keys)
    for prefix in ("", *PREFIXES):
        if prefix + QWEN21_MARKER in keys or prefix + QWEN21_COMFY_MARKER in keys:
            raise CheckpointError(
                f"{path}: this is the Qwen-Image-2.1 VAE (64 channels, 16x, RGBA; use qwen21's load_vae21), "
                "not the Qwen-Image v1 VAE"
            )
        if prefix + WAN22_MARKER in keys:
            raise CheckpointError(f"{path}: this is the Wan 2.2 VAE (48 latent channels), not the Qwen-Image VAE")
        if prefix + WAN_MARKER in keys:
            return "wan", prefix
        if prefix + DIFFUSERS_MARKER in keys:
            return "diffusers", prefix
    for marker, what in FOREIGN:
        if any(k.endswith(marker) for k in keys):
            raise CheckpointError(f"{path}: this is {what}, not the Qwen-Image VAE (qwen_image_vae.safetensors)")
    raise CheckpointError(
        f"{path}: not a Qwen-Image VAE file: neither {WAN_MARKER!r} (ComfyUI / Wan naming) nor "
        f"{DIFFUSERS_MARKER!r} (diffusers naming) is present"
    )


MIDDLE_RULES = tuple((re.compile(p), s) for p, s in (  # Wan's middle Sequential -> diffusers' mid_block
    (r"^(encoder|decoder)\.middle\.0\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0."),
    (r"^(encoder|decoder)\.middle\.2\.", r"\1.mid_block.resnets.1."),
))  # fmt: skip
_WAN_RULES = ((re.compile(r"^encoder\.downsamples\.(\d+)\."), r"encoder.down_blocks.\1."), *MIDDLE_RULES)
_WAN_DECODER_BLOCK = re.compile(r"^decoder\.upsamples\.(\d+)\.")


def top_level_to_diffusers(key: str) -> str | None:
    """A Wan/ComfyUI top-level key (quant convs, conv_in, head) in diffusers naming, or None for any other key."""
    for d, wan in TOP_LEVEL.items():
        if key.startswith(wan + "."):
            return d + key[len(wan) :]
    return None


def residual_to_diffusers(key: str) -> str:
    """Wan's residual Sequential indices (and shortcut) in `key` as diffusers' attribute names."""
    for d, wan in RESIDUAL_PARTS.items():
        key = key.replace(f".{wan}.", f".{d}.")
    return key


def wan_to_diffusers(key: str, num_res_blocks: int = 2) -> str:
    """One Wan/ComfyUI key in diffusers naming (the decoder's flat block index needs num_res_blocks)."""
    top = top_level_to_diffusers(key)
    if top is not None:
        return top
    for pattern, sub in _WAN_RULES:
        key = pattern.sub(sub, key)
    m = _WAN_DECODER_BLOCK.match(key)
    if m:  # flat index n -> stage n // (r + 2): r + 1 residual blocks, then the upsampler
        stage, j = divmod(int(m.group(1)), num_res_blocks + 2)
        block = "upsamplers.0" if j == num_res_blocks + 1 else f"resnets.{j}"
        key = f"decoder.up_blocks.{stage}.{block}." + key[m.end() :]
    return residual_to_diffusers(key)


def infer_config(shapes: Mapping[str, tuple[int, ...]], path, **overrides) -> VAEConfig:
    """A VAEConfig read off the shapes of a diffusers-named 3D state dict."""
    try:
        base, image_channels = shapes["encoder.conv_in.weight"][:2]
        z_dim = shapes["post_quant_conv.weight"][0]
        widths, temporal, in_stage = [], [], 0
        n, counts = 0, [0]
        while (
            f"encoder.down_blocks.{n}.norm1.gamma" in shapes or f"encoder.down_blocks.{n}.resample.1.weight" in shapes
        ):
            if f"encoder.down_blocks.{n}.norm1.gamma" in shapes:
                in_stage = shapes[f"encoder.down_blocks.{n}.conv2.weight"][0]
                counts[-1] += 1
            else:
                widths.append(in_stage)
                temporal.append(f"encoder.down_blocks.{n}.time_conv.weight" in shapes)
                counts.append(0)
            n += 1
        widths.append(in_stage)
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: incomplete Qwen-Image VAE, cannot read its configuration ({e})") from None
    if z_dim != 16:
        raise CheckpointError(f"{path}: a VAE with {z_dim} latent channels, not the 16-channel Qwen-Image VAE")
    if len(set(counts)) != 1 or any(w % base for w in widths):
        raise CheckpointError(f"{path}: unexpected encoder structure (blocks per stage {counts}, widths {widths})")
    return VAEConfig(
        base_dim=base, z_dim=z_dim, dim_mult=tuple(w // base for w in widths), num_res_blocks=counts[0],
        temporal_downsample=tuple(temporal), image_channels=image_channels, **overrides,
    )  # fmt: skip


# --- loading --------------------------------------------------------------------------------------


def _latent_stats(folder: Path) -> dict:
    """latents_mean / latents_std from a diffusers AutoencoderKLQwenImage config.json beside the weights."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cfg, dict) or cfg.get("_class_name") != "AutoencoderKLQwenImage":
        return {}
    return {k: tuple(float(v) for v in cfg[k]) for k in ("latents_mean", "latents_std") if cfg.get(k)}


def read_vae(path: str | os.PathLike) -> tuple[VAEConfig, dict[str, torch.Tensor]]:
    """Open a VAE file or folder: (VAEConfig, 2D image weights in diffusers names), all checks done.

    Accepts ComfyUI's `qwen_image_vae.safetensors`, a diffusers `vae/` folder, or a repo folder that
    contains `vae/`. Raises CheckpointError naming the file for anything else.
    """
    path = Path(path)
    if path.is_dir() and (path / "vae").is_dir():
        path = path / "vae"
    ckpt: Checkpoint = open_checkpoint(path)
    naming, prefix = detect(ckpt.keys(), ckpt.path)
    names = {}  # file key -> diffusers name
    if naming == "wan":  # the decoder's flat indices need the blocks per stage: read them off the encoder
        r = next(n for n in range(len(ckpt)) if f"{prefix}encoder.downsamples.{n}.residual.0.gamma" not in ckpt)
        names = {k: wan_to_diffusers(k[len(prefix) :], r) for k in ckpt if k.startswith(prefix)}
    else:
        names = {k: k[len(prefix) :] for k in ckpt if k.startswith(prefix)}
    shapes = {d: ckpt.shape(k) for k, d in names.items()}
    cfg = infer_config(shapes, ckpt.path, **_latent_stats(path if path.is_dir() else path.parent))
    expected = {d: shape for d, _, shape in layout(cfg)}
    problem = describe_mismatch(ckpt.path, f"Qwen-Image VAE ({naming} naming)", expected, shapes)
    if problem:
        raise CheckpointError(problem)
    bad = {ckpt.dtype(k) for k in names} - {torch.float32, torch.float16, torch.bfloat16}
    if bad:
        raise CheckpointError(f"{ckpt.path}: VAE weights must be float32, float16 or bfloat16, found {bad}")
    return cfg, image_weights({d: ckpt[k] for k, d in names.items()})


def load_vae(path: str | os.PathLike) -> ImageVAE:
    """The Qwen-Image image VAE from ComfyUI's single file or a diffusers folder, built on the meta
    device and filled by assignment (weights keep the file's dtype: bf16, fp16 or fp32)."""
    cfg, weights = read_vae(path)
    with torch.device("meta"):
        vae = ImageVAE(cfg)
    return assign_weights(vae, weights, {}, path, "Qwen-Image VAE").eval()
