"""A DiffSynth blockwise ControlNet ("model patch") file small enough for tests that ComfyUI 0.3.75's
ModelPatchLoader loads exactly as a published one (Comfy-Org/Qwen-Image-DiffSynth-ControlNets).

ComfyUI builds the patch at fixed sizes whatever the file holds (60 blocks of width 3072, `img_in` 64 + extra
channels wide) and loads the state dict strictly, so the file must hold every key at its full shape. A `.pt`
file (ComfyUI reads it with `torch.load(weights_only=True)`) may store tensors as strided views of one small
storage: each 3072 x 3072 weight here is a Hankel view (w[i, j] = pool[offset + i + j]) of one random pool, so the
file is under 1 MB while ComfyUI's detection (`controlnet_blocks.0.y_rms.weight`), shapes and strict load are
those of the real 2 GB file. Each block reads the pool at its own offset, so the blocks differ.
"""

from __future__ import annotations

from pathlib import Path

import torch

WIDTH, BLOCKS, LATENT_IN = 3072, 60, 64  # what ComfyUI's QwenImageBlockWiseControlNet is built with


def state_dict(extra_channels: int = 0, seed: int = 0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """The patch's keys at their full shapes, the matrices as strided views of one pool (see the module)."""
    g = torch.Generator().manual_seed(seed)
    step = 7  # pool offset between consecutive tensors
    pool = (torch.randn(2 * WIDTH + step * (6 * BLOCKS + 3), generator=g) * 0.02).to(dtype)
    sd, k = {}, 0

    def view(shape):
        nonlocal k
        k += 1
        return pool.as_strided(shape, (1,) * len(shape), k * step)

    sd["img_in.weight"], sd["img_in.bias"] = view((WIDTH, LATENT_IN + extra_channels)), view((WIDTH,))
    for i in range(BLOCKS):
        b = f"controlnet_blocks.{i}"
        for norm in ("x_rms", "y_rms"):
            sd[f"{b}.{norm}.weight"] = 1.0 + view((WIDTH,))  # near 1 (a small tensor of its own)
        for proj in ("input_proj", "output_proj"):
            sd[f"{b}.{proj}.weight"], sd[f"{b}.{proj}.bias"] = view((WIDTH, WIDTH)), view((WIDTH,))
    return sd


def write_patch(path, extra_channels: int = 0, seed: int = 0) -> Path:
    """The `.pt` model patch (under 1 MB; ComfyUI holds it in float32 once loaded: about 4.5 GB)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict(extra_channels, seed), path)
    return path
