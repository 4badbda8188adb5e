"""Inpainting against diffusers' QwenImageInpaintPipeline (mask, strength; with a ControlNet too) and masked edits
against its QwenImageEditInpaintPipeline (at the ~1 MP canvas it forces, with a lighter VAE to fit CI) on tiny
random models sharing their weights (final images within 1e-4, float32); ComfyUI's latent noise mask against its
KSamplerX0Inpaint; crop-and-stitch: pixels outside the mask equal the input's bytes exactly (tolerance 0, uint8)
at sizes that are not multiples of 16, for several mask shapes; bad masks named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from tiny_pipeline_repo import diffusers_components, picture, write_repo

import oracles
from qwen_image_core import inpaint as I
from qwen_image_core.pipeline import QwenImagePipeline

ATOL = 1e-4
W, H = 96, 64


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaintrepo")
    te = write_repo(root)
    return root, te


@pytest.fixture(scope="module")
def ours(repo):
    return QwenImagePipeline.from_folder(repo[0])


@pytest.fixture(scope="module")
def components(repo):
    return diffusers_components(*repo)


def box_mask(w, h, box):
    m = Image.new("L", (w, h), 0)
    m.paste(255, box)
    return m


@pytest.mark.parametrize(("strength", "cfg"), [(1.0, 4.0), (0.6, 1.0)], ids=["full-cfg", "strength0.6"])
def test_inpaint_matches_diffusers(ours, components, strength, cfg):
    from diffusers import QwenImageInpaintPipeline as Ref

    image, mask = picture(W, H, 1), box_mask(W, H, (16, 8, 60, 48))
    want = Ref(**components)(
        "a red door", image=image, mask_image=mask, negative_prompt=" ", strength=strength, width=W, height=H,
        num_inference_steps=5, true_cfg_scale=cfg, output_type="pt", generator=torch.Generator().manual_seed(2),
    ).images  # fmt: skip
    got = I.inpaint(ours, "a red door", image, mask, " ", strength=strength, steps=5, cfg_scale=cfg, seed=2)
    err = (got - want).abs().max().item()
    print(f"max abs diff {err:.3g}")
    assert got.shape == want.shape and err <= ATOL


def test_noise_mask_denoiser_equals_comfyuis_ksampler_x0_inpaint():
    from tools.comfy_paths import import_comfy_for_oracle  # noqa: PLC0415

    import_comfy_for_oracle()
    import comfy.model_sampling as ms  # noqa: PLC0415
    from comfy.samplers import KSamplerX0Inpaint  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    x, latent, noise = (torch.randn(2, 16, 6, 8, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 6, 8, generator=g)  # graded, as differential diffusion leaves it
    sigma = torch.tensor([0.7, 0.7])
    model = lambda x_, s_, **kw: torch.tanh(x_) * 0.5  # noqa: E731
    const = type("Flow", (ms.CONST,), {})()

    class Inner:  # what KSamplerX0Inpaint reads off ComfyUI's wrapped model
        inner_model = type("M", (), {"scale_latent_inpaint": lambda self, x, sigma, noise, latent_image:
                                     const.noise_scaling(sigma, noise, latent_image)})()  # fmt: skip

        def __call__(self, x_, s_, model_options=None, seed=None):
            return model(x_, s_)

    ref = KSamplerX0Inpaint(Inner(), None)
    ref.noise, ref.latent_image = noise, latent
    want = ref(x, sigma, denoise_mask=mask)
    got = I.NoiseMaskDenoiser(model, latent, mask, noise)(x, sigma)
    assert (got - want).abs().max().item() <= 1e-6


def _shapes(w, h):
    rect = box_mask(w, h, (w // 5, h // 4, w // 2, h // 2 + 3))
    ellipse = Image.new("L", (w, h), 0)
    ImageDraw.Draw(ellipse).ellipse((w // 3, h // 3, w - 5, h - 2), fill=255)
    stroke = Image.new("L", (w, h), 0)
    ImageDraw.Draw(stroke).line((0, h - 1, w - 1, 0), fill=180, width=5)  # soft, touching two corners
    edge = box_mask(w, h, (w - 9, 0, w, h))  # along the right border
    return {"rect": rect, "ellipse": ellipse, "soft-stroke": stroke, "edge": edge}


@pytest.mark.parametrize("size", [(101, 75), (150, 47)])
def test_crop_and_stitch_keeps_unmasked_pixels_exactly(size):
    w, h = size
    src = picture(w, h, 7)
    seen = []

    def job(crop, crop_mask):
        seen.append((crop.size, crop_mask.size))
        assert crop.size[0] % 16 == 0 and crop.size[1] % 16 == 0
        return Image.fromarray(255 - np.asarray(crop))  # repaint: invert the crop

    for name, mask in _shapes(w, h).items():
        out = I.crop_and_stitch(src, mask, job, pad=8, area=128 * 128)
        a, b, m = np.asarray(out), np.asarray(src), np.asarray(mask)
        assert out.size == src.size
        assert (a[m == 0] == b[m == 0]).all(), name  # tolerance 0 outside the mask
        assert (a[m > 0] != b[m > 0]).any(), name  # the repaint arrived inside it
    assert len(seen) == 4


def test_crop_and_stitch_empty_and_full_masks():
    src = picture(70, 50, 3)
    calls = []
    out = I.crop_and_stitch(src, Image.new("L", (70, 50), 0), lambda c, m: calls.append(1) or c)
    assert not calls and np.array_equal(np.asarray(out), np.asarray(src))  # empty: nothing to repaint
    out = I.crop_and_stitch(src, Image.new("L", (70, 50), 255), lambda c, m: Image.new("RGB", c.size, (9, 9, 9)))
    assert (np.asarray(out) == 9).all()  # full: the whole image is the job's


def test_bad_masks_are_named(ours):
    image = picture(W, H, 1)
    with pytest.raises(ValueError, match="mask is 32x32 pixels"):
        I.crop_and_stitch(image, Image.new("L", (32, 32), 255), lambda c, m: c)
    with pytest.raises(ValueError, match="mask is 32x32 pixels"):
        I.inpaint(ours, "x", image, torch.ones(1, 32, 32), steps=2)
    with pytest.raises(ValueError, match="mask has a batch of 3"):
        I.inpaint(ours, "x", image, torch.ones(3, H, W), steps=2, batch_size=2)
    with pytest.raises(ValueError, match="one mask"):
        I.crop_and_stitch(image, torch.ones(2, H, W), lambda c, m: c)


@pytest.fixture(scope="module")
def light_vae(tmp_path_factory):
    """diffusers' QwenImage VAE with one residual block a stage, and ours from the same weights. diffusers'
    edit-inpaint pipeline always works at ~1 MP (calculate_dimensions(1024 * 1024, ...); height / width are
    overwritten), where its VAE (two encodes, one decode) is most of the cost: its causal conv3d takes oneDNN
    only when channels x 3 frames x height > 20480 (PyTorch's heuristic), else a slow path several times
    slower. base_dim 8 on a portrait canvas (1248 high) keeps the full-resolution convs (8 channels) on oneDNN."""
    from diffusers import AutoencoderKLQwenImage

    from qwen_image_core.formats.vae import load_vae
    from qwen_image_core.vae import VAEConfig
    from tools.checkpoints.vae import random_vae_weights

    cfg = VAEConfig(base_dim=8, num_res_blocks=1)
    ref = AutoencoderKLQwenImage(
        base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
        attn_scales=[], temperal_downsample=list(cfg.temporal_downsample), dropout=0.0,
        latents_mean=list(cfg.latents_mean), latents_std=list(cfg.latents_std),
    ).eval()  # fmt: skip
    ref.load_state_dict(random_vae_weights(cfg, seed=5), strict=True)
    folder = tmp_path_factory.mktemp("lightvae")
    ref.save_pretrained(folder)
    return ref, load_vae(folder)


def test_edit_inpaint_matches_diffusers(ours, components, light_vae):
    from diffusers import QwenImageEditInpaintPipeline as Ref

    ref_vae, our_vae = light_vae
    pipe = QwenImagePipeline(ours.dit, our_vae, ours.text_encoder)
    image, mask = picture(32, 48, 4), box_mask(32, 48, (4, 8, 20, 30))  # ~1 MP canvas (832 x 1248), as diffusers
    want = Ref(**{**components, "vae": ref_vae}, processor=oracles.processor(components["tokenizer"]))(
        image=image, mask_image=mask, prompt="make it blue", strength=0.9, num_inference_steps=2, true_cfg_scale=1.0,
        output_type="pt", generator=torch.Generator().manual_seed(5),
    ).images  # fmt: skip
    got = I.edit_inpaint(pipe, "make it blue", image, mask, strength=0.9, steps=2, cfg_scale=1.0, seed=5)
    err = (got - want).abs().max().item()
    print(f"max abs diff {err:.3g}")
    assert got.shape == want.shape and err <= ATOL
