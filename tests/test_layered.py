"""Qwen-Image-Layered's DiT and RGBA VAE against diffusers (issue 16), on tiny random models in the real layouts.

The DiT: diffusers' QwenImageTransformer2DModel(use_layer3d_rope=True, use_additional_t_cond=True) on the
tokens its QwenImageLayeredPipeline packs ([layer frames | input image], img_shapes with the input last),
our MMDiT on the layered latent [B, 16, N + 1, h, w] with the input as its reference; loaded from a ComfyUI
single file (detected by its addition_t_embedding key alone), a diffusers folder (config.json flags) and a
ComfyUI fp8mixed file. The VAE: AutoencoderKLQwenImage(input_channels=4) on RGBA images, ComfyUI and
diffusers layouts, untiled and tiled.
"""

from __future__ import annotations

import pytest
import torch

from oracles import assert_close
from qwen_image_core import layered
from qwen_image_core.formats.vae import load_vae
from qwen_image_core.mmdit import load_dit, patchify, unpatchify
from qwen_image_core.vae import Tiling, VAEConfig
from tools.checkpoints import dit as W
from tools.checkpoints.vae import random_vae_weights, write_vae

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = W.tiny_config(**W.LAYERED)
VAE_TOL = 1e-4


def diffusers_layered_dit(state_dict):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    m = QwenImageTransformer2DModel(
        patch_size=CFG.patch_size, in_channels=CFG.in_channels, out_channels=CFG.out_channels,
        num_layers=CFG.num_layers, attention_head_dim=CFG.head_dim, num_attention_heads=CFG.num_heads,
        joint_attention_dim=CFG.text_dim, axes_dims_rope=CFG.rope_axes, use_layer3d_rope=True,
        use_additional_t_cond=True,
    )  # fmt: skip
    m.load_state_dict(state_dict, strict=True)
    return m.eval()


def diffusers_layered_velocity(m, img, cond, sigma, txt, mask=None):
    """The reference pipeline's call: packed layer frames then the input image, velocity of the layers only."""
    b, _, f, h, w = img.shape
    tokens, (gh, gw) = patchify(img.transpose(1, 2).flatten(0, 1), 2)
    tokens = tokens.unflatten(0, (b, f)).flatten(1, 2)
    ctok, (ch, cw) = patchify(cond.expand(b, -1, -1, -1), 2)
    shapes = [[(1, gh, gw)] * f + [(1, ch, cw)]] * b
    with torch.no_grad():
        out = m(
            hidden_states=torch.cat([tokens, ctok], 1), encoder_hidden_states=txt, encoder_hidden_states_mask=mask,
            timestep=sigma, img_shapes=shapes, additional_t_cond=torch.zeros(b, dtype=torch.long), return_dict=False,
        )[0][:, : tokens.shape[1]]  # fmt: skip
    frames = unpatchify(out.unflatten(1, (f, -1)).flatten(0, 1), (gh, gw), 2, (h, w))
    return frames.unflatten(0, (b, f)).transpose(1, 2)


def layered_inputs(b, layers, h, w, ch, cw, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, 16, layers + 1, h, w, generator=g)
    cond = torch.randn(1, 16, ch, cw, generator=g)
    return img, cond, torch.rand(b, generator=g), torch.randn(b, L, CFG.text_dim, generator=g)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("layered_dit")
    return dict(
        comfy=W.write_comfy(d / "qwen_image_layered_bf16.safetensors", CFG, dtype=torch.float32, prefix=W.PREFIX),
        diffusers=W.write_diffusers(d / "repo", CFG, dtype=torch.float32, repo=True),
        fp8mixed=W.write_mixed(d / "qwen_image_layered_fp8mixed.safetensors", CFG, comfy_quant=True),
    )


@pytest.fixture(scope="module")
def reference():
    return diffusers_layered_dit(W.state_dict(CFG))


@pytest.mark.parametrize("layers,size,cond_size", [(2, (8, 12), (8, 12)), (4, (6, 6), (10, 8))])
def test_layered_dit_matches_diffusers(files, reference, layers, size, cond_size):
    """2 and 4 layers, the input image of the layers' size or another; ComfyUI file and diffusers folder."""
    img, cond, sigma, txt = layered_inputs(1, layers, *size, *cond_size)
    want = diffusers_layered_velocity(reference, img, cond, sigma, txt)
    for kind in ("comfy", "diffusers"):
        ours = load_dit(files[kind])
        assert ours.config.layer3d_rope and ours.config.additional_t_cond, kind
        with torch.no_grad():
            got = ours(img, sigma, txt, ref_latents=[cond])
        assert got.shape == img.shape
        assert_close(got, want)


def test_layered_dit_masked_batch_and_fp8mixed(files):
    """Batch 2 with text of 7 and 4 tokens; the fp8mixed file against diffusers on its dequantised weights."""
    img, cond, sigma, txt = layered_inputs(2, 3, 8, 8, 8, 8, seed=3)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    ours = load_dit(files["fp8mixed"])
    assert ours.config.layer3d_rope and "float8" in ours.storage
    ref = diffusers_layered_dit(W.dequantized(files["fp8mixed"]))
    with torch.no_grad():
        assert_close(ours(img, sigma, txt, txt_mask=mask, ref_latents=[cond]),
                     diffusers_layered_velocity(ref, img, cond, sigma, txt, mask))  # fmt: skip


def test_layered_gguf_with_a_quantised_embedding(tmp_path):
    """Converted GGUFs quantise the 2 x 3072 addition_t_embedding (over 1024 values): it loads as float."""
    from tools.checkpoints import gguf as G

    key = "time_text_embed.addition_t_embedding.weight"
    path = G.write_gguf(tmp_path / "qwen_image_layered-Q8_0.gguf", CFG, "Q8_0", types={key: "Q8_0"})
    assert G.file_types(path)[key] == "Q8_0"
    ours = load_dit(path)
    assert ours.config.layer3d_rope and ours.config.additional_t_cond
    img, cond, sigma, txt = layered_inputs(1, 2, 6, 8, 6, 8, seed=5)
    want = diffusers_layered_velocity(diffusers_layered_dit(G.dequantized(path)), img, cond, sigma, txt)
    with torch.no_grad():
        assert_close(ours(img, sigma, txt, ref_latents=[cond]), want)


def test_plain_dit_refuses_layered_latents(tmp_path):
    plain = load_dit(W.write_comfy(tmp_path / "qwen_image.safetensors", W.tiny_config(), dtype=torch.float32))
    assert not plain.config.layer3d_rope and not plain.config.additional_t_cond
    img, cond, sigma, txt = layered_inputs(1, 2, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="needs a Qwen-Image-Layered DiT"):
        plain(img, sigma, txt, ref_latents=[cond])
    with pytest.raises(ValueError, match="not a Qwen-Image-Layered model"):
        layered.check_dit(plain, "the model input")


def test_layered_dit_refuses_image_latents(files):
    """The reverse: an ordinary latent (KSampler, the Qwen-Image Sampler) on the layered model is refused by name."""
    img, cond, sigma, txt = layered_inputs(1, 1, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="Qwen-Image-Layered.*Layered Sampler"):
        load_dit(files["comfy"])(img[:, :, 0], sigma, txt, ref_latents=[cond])


# -- the RGBA VAE


@pytest.fixture(scope="module")
def rgba_vaes(tmp_path_factory):
    from diffusers import AutoencoderKLQwenImage

    cfg = VAEConfig(base_dim=8, image_channels=4)
    d = tmp_path_factory.mktemp("layered_vae")
    comfy = write_vae(d / "comfy", "comfy", base_dim=8, image_channels=4, dtype=torch.float32, seed=5)
    folder = write_vae(d / "diff", "diffusers", base_dim=8, image_channels=4, dtype=torch.float32, seed=5)
    ref = AutoencoderKLQwenImage.from_pretrained(folder / "vae").eval()
    assert torch.equal(ref.encoder.conv_in.weight, random_vae_weights(cfg, 5)["encoder.conv_in.weight"])
    return load_vae(comfy), load_vae(folder), ref


def test_rgba_vae_encode_decode_match_diffusers(rgba_vaes):
    ours_comfy, ours_diffusers, ref = rgba_vaes
    x = torch.rand(2, 4, 48, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = torch.randn(2, 16, 6, 5, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(ref.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        want_z = ((ref.encode(x[:, :, None]).latent_dist.mode() - mean) / std)[:, :, 0]
        want_x = ref.decode(z[:, :, None] * std + mean).sample[:, :, 0].clamp(-1, 1)
    for ours in (ours_comfy, ours_diffusers):
        assert ours.cfg.image_channels == 4
        err_z, err_x = (ours.encode(x) - want_z).abs().max().item(), (ours.decode(z) - want_x).abs().max().item()
        assert err_z <= VAE_TOL and err_x <= VAE_TOL, (err_z, err_x)


def test_rgba_vae_tiled(rgba_vaes):
    """The 2D fast path tiles RGBA like RGB: one tile equals the untiled pass, several keep 4 channels."""
    vae = rgba_vaes[0]
    z = torch.randn(1, 16, 20, 24, generator=torch.Generator().manual_seed(2))
    untiled = vae.decode(z, tile=False)
    assert torch.equal(vae.decode(z, tile=Tiling(256, 64)), untiled)
    tiled = vae.decode(z, tile=Tiling(64, 16))
    assert tiled.shape == (1, 4, 160, 192) and torch.isfinite(tiled).all()
    x = torch.rand(1, 4, 160, 192, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert vae.encode(x, tile=Tiling(64, 16)).shape == (1, 16, 20, 24)


def test_bad_inputs_are_named(rgba_vaes, tmp_path):
    rgb = load_vae(write_vae(tmp_path, "comfy", base_dim=8, dtype=torch.float32))
    with pytest.raises(ValueError, match="vae takes 3-channel images; layer decomposition needs the RGBA VAE"):
        layered.check_vae(rgb, "vae")
    layered.check_vae(rgba_vaes[0])
    for bad in (0, -1, layered.MAX_LAYERS + 1, 2.0):
        with pytest.raises(ValueError, match=r"layers is .*1\.\."):
            layered.check_layers(bad)
    layered.check_layers(layered.MAX_LAYERS)
