"""Whole pipelines against diffusers' QwenImage*Pipelines on tiny random models that share their weights.

One diffusers-layout repo folder (transformer/, vae/, text_encoder/, tokenizer/) is written from seeded
random weights; ours loads it with `QwenImagePipeline.from_folder`, the oracle is diffusers' pipeline
built from the same files (text encoder: see tests/oracles.py). Final images in [0, 1] must agree to 1e-4.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import oracles
from qwen_image_core.pipeline import QwenImagePipeline
from tools.checkpoints import dit as D
from tools.checkpoints import qwen_vl as Q
from tools.checkpoints.vae import write_vae

ATOL = 1e-4
STEPS = 3


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    cfg = D.tiny_config(text_dim=Q.TINY_TEXT["hidden_size"])
    D.write_diffusers(root, cfg, dtype=torch.float32, repo=True)
    write_vae(root, "diffusers", base_dim=8, dtype=torch.float32, seed=5)
    te = Q.reference_model(seed=0, cls=oracles.VLOracle)
    Q.write_hf_folder(root / "text_encoder", te, dtype=torch.bfloat16)  # the weights are bf16-exact
    shutil.copytree(oracles.TOKENIZER, root / "tokenizer")
    return root, cfg, te


@pytest.fixture(scope="module")
def ours(repo):
    return QwenImagePipeline.from_folder(repo[0])


@pytest.fixture(scope="module")
def parts(repo):
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    root, _, te = repo
    tok = oracles.tokenizer()
    return dict(
        transformer=QwenImageTransformer2DModel.from_pretrained(root / "transformer").eval(),
        vae=AutoencoderKLQwenImage.from_pretrained(root / "vae").eval(),
        text_encoder=te,
        tokenizer=tok,
        scheduler=oracles.scheduler(),
    ), oracles.processor(tok)


def picture(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def check(ours: torch.Tensor, ref: torch.Tensor):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = (ours.float() - ref.float()).abs().max().item()
    print(f"max abs diff {err:.3g}")
    assert err <= ATOL, f"max abs diff {err:.3g} > {ATOL}"


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0], ids=["no-cfg", "true-cfg"])
def test_text_to_image_matches_diffusers(ours, parts, cfg_scale):
    from diffusers import QwenImagePipeline as Ref

    components, _ = parts
    ref = Ref(**components)
    kw = dict(width=96, height=64, num_inference_steps=STEPS, true_cfg_scale=cfg_scale, output_type="pt")
    g = torch.Generator().manual_seed(3)
    want = ref("a red fox in the snow", negative_prompt="blurry, low quality", generator=g, **kw).images
    got = ours.generate(
        "a red fox in the snow", "blurry, low quality", width=96, height=64, steps=STEPS, cfg_scale=cfg_scale, seed=3
    )
    check(got, want)


def test_batched_cfg_equals_two_pass_reference(ours, parts):
    """A negative prompt of another length: one masked batch of 2 here, two passes in diffusers."""
    from diffusers import QwenImagePipeline as Ref

    components, _ = parts
    want = Ref(**components)(
        "a lighthouse on a cliff at night, long exposure, stars",
        negative_prompt=" ",
        width=64,
        height=64,
        num_inference_steps=STEPS,
        true_cfg_scale=5.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(1),
    ).images
    got = ours.generate(
        "a lighthouse on a cliff at night, long exposure, stars",
        " ",
        width=64,
        height=64,
        steps=STEPS,
        cfg_scale=5.0,
        seed=1,
    )
    check(got, want)


def test_img2img_matches_diffusers(ours, parts):
    from diffusers import QwenImageImg2ImgPipeline as Ref

    components, _ = parts
    start = picture(96, 64, 0)
    want = Ref(**components)(
        "an oil painting",
        image=start,
        negative_prompt=" ",
        strength=0.6,
        width=96,
        height=64,
        num_inference_steps=5,
        true_cfg_scale=4.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(4),
    ).images
    got = ours.generate(
        "an oil painting", " ", width=96, height=64, steps=5, cfg_scale=4.0, seed=4, image=start, strength=0.6
    )
    check(got, want)


def test_edit_matches_diffusers(ours, parts):
    from diffusers import QwenImageEditPipeline as Ref

    components, proc = parts
    image = picture(120, 80, 1)
    want = Ref(**components, processor=proc)(
        image=image,
        prompt="make it winter",
        negative_prompt=" ",
        width=96,
        height=64,
        num_inference_steps=2,
        true_cfg_scale=4.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(5),
    ).images
    got = ours.edit("make it winter", image, " ", variant="edit", width=96, height=64, steps=2, cfg_scale=4.0, seed=5)
    check(got, want)


def test_edit_plus_two_images_of_different_aspect_matches_diffusers(ours, parts):
    from diffusers import QwenImageEditPlusPipeline as Ref

    components, proc = parts
    images = [picture(120, 80, 2), picture(60, 100, 3)]
    want = Ref(**components, processor=proc)(
        image=images,
        prompt="put the pattern of Picture 2 on Picture 1",
        negative_prompt=" ",
        width=64,
        height=96,
        num_inference_steps=2,
        true_cfg_scale=4.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(6),
    ).images
    got = ours.edit(
        "put the pattern of Picture 2 on Picture 1",
        images,
        " ",
        variant="edit_plus",
        width=64,
        height=96,
        steps=2,
        cfg_scale=4.0,
        seed=6,
    )
    check(got, want)


def test_edit_official_output_size_and_keep_size(ours):
    image = picture(300, 200, 7)
    official = ours.edit("x", image, steps=1, cfg_scale=1.0, variant="edit_plus")
    assert official.shape[-2:] == (832, 1248)  # ~1 MP at 3:2, sides multiples of 32 (diffusers' rule)
    keep = ours.edit("x", [picture(250, 170, 8), image], steps=1, cfg_scale=1.0, resize="keep")
    assert keep.shape[-2:] == (160, 240)  # the first reference's own size, cropped to a multiple of 16
