"""Qwen-Image-Layered through a real ComfyUI server (issue 16): the ordinary loaders read the layered DiT and the
RGBA VAE, the Layered Sampler and Decode run, SaveImage writes each layer as an RGBA PNG whose alpha is the
decoded alpha exactly (as SaveImage quantises it), the MASK output is 1 - alpha, and wrong models are named."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from graphs import fails
from native_graphs import node
from tools.checkpoints import dit as W
from tools.checkpoints.vae import write_vae

pytestmark = pytest.mark.e2e

TEXT_DIM = W.TINY["text_dim"]
LAYERED_DIT, PLAIN_DIT = "qwen_image_layered_e2e.safetensors", "qwen_image_plain_e2e.safetensors"
RGBA_VAE, RGB_VAE = "qwen_image_layered_vae_e2e.safetensors", "qwen_image_vae_e2e_rgb.safetensors"


@pytest.fixture(scope="module")
def layered_models(comfy, tmp_path_factory):
    dits = comfy.models_dir / "diffusion_models"
    W.write_comfy(dits / LAYERED_DIT, W.tiny_config(**W.LAYERED), dtype=torch.bfloat16)
    W.write_comfy(dits / PLAIN_DIT, W.tiny_config(), dtype=torch.bfloat16)
    tmp = tmp_path_factory.mktemp("layered_vaes")
    for name, channels in ((RGBA_VAE, 4), (RGB_VAE, 3)):
        written = write_vae(tmp / name, "comfy", base_dim=8, image_channels=channels, seed=3)
        shutil.copyfile(written, comfy.models_dir / "vae" / name)
    return comfy


def graph(dit=LAYERED_DIT, vae=RGBA_VAE, layers=1, cfg=1.0, steps=1):
    return {
        "dit": node("QwenPixDiTLoader", dit_name=dit, compute_dtype="fp32", positions="official (diffusers)"),
        "vae": node("QwenPixVAELoader", vae_name=vae),
        "pos": node("QwenPixTestConditioning", seed=1, tokens=9, dim=TEXT_DIM),
        "neg": node("QwenPixTestConditioning", seed=2, tokens=1, dim=TEXT_DIM),
        "img": node("QwenPixTestImage", kind="rgba", width=96, height=64, seed=4),
        "sample": node(
            "QwenPixLayeredSampler",
            dit=["dit", 0],
            vae=["vae", 0],
            positive=["pos", 0],
            negative=["neg", 0],
            image=["img", 0],
            layers=layers,
            resolution="640",
            seed=5,
            steps=steps,
            cfg=cfg,
            cfg_normalize=True,
        ),  # fmt: skip
        "decode": node(
            "QwenPixLayeredDecode", vae=["vae", 0], samples=["sample", 0], tiling="off", tile_size=512, overlap=64
        ),  # fmt: skip
        "sink": node("QwenPixTestSink", value=["decode", 1], salt=0),
    }


def runs(total: int) -> list[tuple[int, int]]:
    return [(i, total) for i in range(1, total + 1)]


def test_layers_saved_as_rgba_pngs_keep_the_decoded_alpha(layered_models, client):
    """Every layer saved as an RGBA PNG equal to the decoded layers; the sampler and decode report ComfyUI
    progress as v1's nodes do (VAE stages, steps)."""
    prompt = graph(layers=2, steps=2)
    prompt["save"] = node("SaveImage", images=["decode", 0], filename_prefix="layered/e2e")
    prompt["dump"] = node("QwenPixTestDumpImage", images=["decode", 0], name="layered_layers")
    prompt["mask_img"] = node("MaskToImage", mask=["decode", 1])
    prompt["dump_mask"] = node("QwenPixTestDumpImage", images=["mask_img", 0], name="layered_masks")
    prompt["dump_composite"] = node("QwenPixTestDumpImage", images=["decode", 2], name="layered_composite")
    res = client.run(prompt, timeout=300)
    assert res.status == "success", (res.error() or {}).get("exception_message")
    assert "Qwen-Image-Layered" in str(res.outputs["dit"]["qwenpix_plan"])  # the loader says what drives it
    progress = {
        n: [(e["data"]["value"], e["data"]["max"]) for e in res.events if e.get("type") == "progress"
            and e["data"].get("node") == n] for n in ("sample", "decode")
    }  # fmt: skip
    sample, decode = progress["sample"], progress["decode"]
    stages = sample[0][1]  # the picture's VAE encode, per encoder stage, then the sampler's steps (2 here)
    assert stages >= 2 and sample == runs(stages) + runs(2), sample
    stages = decode[0][1]  # per decoder stage: the layers, then the composite
    assert stages >= 2 and decode == runs(stages) * 2, decode
    out = layered_models.output_dir
    layers = np.load(out / "layered_layers.npy")
    assert layers.shape == (2, 512, 768, 4)  # 96x64 -> about 640^2 at 3:2, sides multiples of 32
    assert np.load(out / "layered_composite.npy").shape == (1, 512, 768, 4)
    np.testing.assert_array_equal(np.load(out / "layered_masks.npy")[..., 0], 1.0 - layers[..., 3])
    images = res.images()
    assert len(images) == 2
    alpha = layers[..., 3]
    assert alpha.min() < 0.99 and alpha.std() > 0.01  # the layers' alpha is not trivially opaque
    for i, img in enumerate(images):
        with Image.open(out / img["subfolder"] / img["filename"]) as png:
            assert png.mode == "RGBA" and png.size == (768, 512)
            saved = np.asarray(png)
        expect = np.clip(255.0 * layers[i], 0, 255).astype(np.uint8)  # SaveImage's own conversion
        np.testing.assert_array_equal(saved[..., 3], expect[..., 3])
        np.testing.assert_array_equal(saved, expect)


def test_wrong_models_and_latents_are_named(layered_models, client):
    fails(client, graph(dit=PLAIN_DIT), "sample", "dit is not a Qwen-Image-Layered model")
    fails(client, graph(vae=RGB_VAE), "sample", "vae takes 3-channel images", "RGBA VAE")
    prompt = graph()  # the reverse: the layered model on the ordinary sampler
    prompt["lat"] = node("QwenPixEmptyLatent", aspect="custom", width=64, height=64, batch_size=1)
    prompt["plain"] = node(
        "QwenPixSampler", dit=["dit", 0], positive=["pos", 0], negative=["neg", 0], latent_image=["lat", 0], seed=0,
        steps=1, cfg=1.0, sampler_name="euler", schedule="shift (ComfyUI workflows)", shift=3.1,
        cfg_rescale="none", denoise=1.0,
    )  # fmt: skip
    for key in ("sample", "decode"):
        prompt.pop(key)
    prompt["sink"] = node("QwenPixTestSink", value=["plain", 0], salt=1)
    fails(client, prompt, "plain", "Qwen-Image-Layered", "Layered Sampler")
    bad = graph()
    bad["decode"]["inputs"]["samples"] = ["lat", 0]
    bad["lat"] = node("QwenPixEmptyLatent", aspect="custom", width=64, height=64, batch_size=1)
    bad.pop("sample")
    fails(client, bad, "decode", "samples", "not a layered latent")
