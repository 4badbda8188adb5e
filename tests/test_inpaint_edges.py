"""Inpainting's documented edge cases, measured on the tiny float32 pipeline (qwen_image_core.inpaint): an empty mask
repaints nothing (the output is the input image's VAE round trip, whatever the prompt), a full mask is img2img at
the same strength (the same noise, schedule and Euler steps), bit for bit."""

from __future__ import annotations

import pytest
import torch
from tiny_pipeline_repo import picture, write_repo

from qwen_image_core import inpaint as I
from qwen_image_core import sampling
from qwen_image_core.control import pixels
from qwen_image_core.pipeline import QwenImagePipeline, make_sigmas

pytestmark = pytest.mark.usefixtures("one_thread")
W, H, STEPS, SEED, STRENGTH = 64, 48, 3, 3, 0.7


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint_edges")
    write_repo(root)
    return QwenImagePipeline.from_folder(root)


def test_empty_and_full_masks(ours):
    image = picture(W, H, 1)
    run = dict(strength=STRENGTH, steps=STEPS, seed=SEED, cfg_scale=4.0)
    empty = I.inpaint(ours, "a cat", image, torch.zeros(1, H, W), **run)
    other = I.inpaint(ours, "a dog on a sofa", image, torch.zeros(1, H, W), **run)
    full = I.inpaint(ours, "a cat", image, torch.ones(1, H, W), **run)

    g = torch.Generator().manual_seed(SEED)  # inpaint's draws: the image's posterior sample, then the noise
    z = ours.encode_images(pixels(image, W, H), torch.float32, sample=True, generator=g).float()
    noise = torch.randn((1, 16, H // 8, W // 8), generator=g)
    assert torch.equal(empty, ours.decode(z)) and torch.equal(empty, other)  # nothing repainted, prompt unused

    cond, uncond = ours.encode_t2i(["a cat"], None, 4.0, torch.float32, 512)
    sigmas = sampling.sigmas_for_strength(make_sigmas("dynamic", STEPS, H, W), STRENGTH)
    img2img = ours.decode(ours.sample(noise, cond, uncond, sigmas=sigmas, cfg_scale=4.0, latents=z))
    print(f"\nfull mask vs img2img: max diff {float((full - img2img).abs().max()):.3g}")
    assert torch.equal(full, img2img)
    assert (full - empty).abs().max() > 1e-3  # and the full mask did repaint
