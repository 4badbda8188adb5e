"""The tiny float32 Qwen-Image diffusers repo the ControlNet and inpainting parity tests share (DiT, VAE, the
Qwen2.5-VL oracle's weights, the tokenizer), diffusers' components on it, and a random test picture."""

from __future__ import annotations

import shutil

import numpy as np
import torch
from PIL import Image

import oracles
from tools.checkpoints import dit as D
from tools.checkpoints import qwen_vl as Q
from tools.checkpoints.vae import write_vae


def write_repo(root):
    """Writes the repo into `root` -> the reference text encoder whose weights it holds (bf16 on disk)."""
    cfg = D.tiny_config(text_dim=Q.TINY_TEXT["hidden_size"])
    D.write_diffusers(root, cfg, dtype=torch.float32, repo=True)
    write_vae(root, "diffusers", base_dim=8, dtype=torch.float32, seed=5)
    te = Q.reference_model(seed=0, cls=oracles.VLOracle)
    Q.write_hf_folder(root / "text_encoder", te, dtype=torch.bfloat16)
    shutil.copytree(oracles.TOKENIZER, root / "tokenizer")
    return te


def diffusers_components(root, te) -> dict:
    """diffusers' pipeline components on the repo in `root` (its transformer and VAE, the text encoder `te`)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel  # noqa: PLC0415 (test-only, slow)

    return dict(
        transformer=QwenImageTransformer2DModel.from_pretrained(root / "transformer").eval(),
        vae=AutoencoderKLQwenImage.from_pretrained(root / "vae").eval(),
        text_encoder=te,
        tokenizer=oracles.tokenizer(),
        scheduler=oracles.scheduler(),
    )


def picture(w: int, h: int, seed: int) -> Image.Image:
    """A w x h RGB picture of uniform random bytes."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
