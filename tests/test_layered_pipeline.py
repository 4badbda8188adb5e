"""`layered.decompose` against diffusers' QwenImageLayeredPipeline (issue 16) on tiny random models sharing weights.

One diffusers-layout repo (layered transformer/, RGBA vae/, text_encoder/, tokenizer/) is written from seeded
random weights; ours loads the parts with the ordinary loaders. The reference only takes resolution 640 or
1024; to keep the test small its module-level `calculate_dimensions` is wrapped so that it sizes the picture
for 128^2 pixels instead, and ours runs with resolution=128 (the same rule: area, aspect, sides of 32).
Layers (RGBA in [0, 1]) must agree to 1e-4 for 2 and 4 layers, with and without CFG (and cfg_normalize).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import oracles
from qwen_image_core import layered
from qwen_image_core.formats.vae import load_vae
from qwen_image_core.mmdit import load_dit
from qwen_image_core.text_encoder import load_text_encoder
from tools.checkpoints import dit as D
from tools.checkpoints import qwen_vl as Q
from tools.checkpoints.vae import write_vae

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
STEPS = 2
RESOLUTION = 128  # the reference's 640 scaled down (see the module docstring)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("layered_repo")
    cfg = D.tiny_config(text_dim=Q.TINY_TEXT["hidden_size"], **D.LAYERED)
    D.write_diffusers(root, cfg, dtype=torch.float32, repo=True)
    write_vae(root, "diffusers", base_dim=8, image_channels=4, dtype=torch.float32, seed=5)
    te = Q.reference_model(seed=0, cls=oracles.VLOracle)
    Q.write_hf_folder(root / "text_encoder", te, dtype=torch.bfloat16)  # the weights are bf16-exact
    shutil.copytree(oracles.TOKENIZER, root / "tokenizer")
    return root, te


@pytest.fixture(scope="module")
def ours(repo):
    root, _ = repo
    te = load_text_encoder(root / "text_encoder", tokenizer=root / "tokenizer")
    return load_dit(root / "transformer"), load_vae(root / "vae"), te


@pytest.fixture(scope="module")
def reference(repo):
    from diffusers import AutoencoderKLQwenImage, QwenImageLayeredPipeline, QwenImageTransformer2DModel
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_layered as module

    root, te = repo
    tok = oracles.tokenizer()
    pipe = QwenImageLayeredPipeline(
        scheduler=oracles.scheduler(),
        vae=AutoencoderKLQwenImage.from_pretrained(root / "vae").eval(),
        text_encoder=te,
        tokenizer=tok,
        processor=oracles.processor(tok),
        transformer=QwenImageTransformer2DModel.from_pretrained(root / "transformer").eval(),
    )
    original = module.calculate_dimensions
    module.calculate_dimensions = lambda area, ratio: original(RESOLUTION * RESOLUTION, ratio)
    yield pipe
    module.calculate_dimensions = original


def picture(w, h, seed):
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((h, w)) < 0.3, 0, rgba[..., 3])  # some fully transparent pixels
    return Image.fromarray(rgba, "RGBA")


@pytest.mark.parametrize(
    "layers,cfg_scale,normalize",
    [(2, 1.0, False), (2, 4.0, False), (4, 1.0, False), (4, 4.0, True)],
    ids=["2-layers", "2-layers-cfg", "4-layers", "4-layers-cfg-normalize"],
)
def test_decompose_matches_diffusers(ours, reference, layers, cfg_scale, normalize):
    image = picture(150, 100, seed=layers)
    prompt, negative = "a red fox on a white plate, a blue sky", " "
    g = torch.Generator().manual_seed(7)
    want = reference(
        image, prompt, negative_prompt=negative, true_cfg_scale=cfg_scale, layers=layers, num_inference_steps=STEPS,
        generator=g, output_type="pt", cfg_normalize=normalize,
    ).images[0]  # fmt: skip
    dit, vae, te = ours
    got = layered.decompose(
        dit, vae, te, image, prompt, layers=layers, resolution=RESOLUTION, negative_prompt=negative, steps=STEPS,
        cfg_scale=cfg_scale, cfg_normalize=normalize, seed=7,
    )  # fmt: skip
    assert got.layers.shape == want.shape == (layers, 4, 96, 160), (got.layers.shape, want.shape)
    assert got.composite.shape == (1, 4, 96, 160) and got.latents.shape == (1, 16, layers + 1, 12, 20)
    assert want.std() > 0.01 and (want[0] - want[1]).abs().max() > 0.01  # not saturated, the layers differ
    err = (got.layers - want.float()).abs().max().item()
    print(f"{layers} layers, cfg {cfg_scale}, normalize {normalize}: max abs diff {err:.3g}")
    assert err <= ATOL, f"max abs diff {err:.3g} > {ATOL}"


def test_one_step_schedule_is_finite():
    """The reference's terminal stretch is 0 / 0 for one step; ours is [1, 0] then."""
    assert layered.layered_sigmas(1, (12, 20)).tolist() == [1.0, 0.0]
    assert torch.isfinite(layered.layered_sigmas(3, (12, 20))).all()


def test_decompose_refuses_bad_inputs(ours, tmp_path):
    dit, vae, te = ours
    image = picture(64, 64, seed=0)
    with pytest.raises(ValueError, match="prompt is empty"):
        layered.decompose(dit, vae, te, image, "  ", layers=2, resolution=RESOLUTION)
    with pytest.raises(ValueError, match="layers is 0"):
        layered.decompose(dit, vae, te, image, "x", layers=0, resolution=RESOLUTION)
    rgb = load_vae(write_vae(tmp_path, "comfy", base_dim=8, dtype=torch.float32))
    with pytest.raises(ValueError, match="RGBA VAE"):
        layered.decompose(dit, rgb, te, image, "x", layers=2, resolution=RESOLUTION)
