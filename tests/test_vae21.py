"""The Qwen-Image-2.1 VAE (64 channels, 16x, RGBA) against diffusers 0.42.1's AutoencoderKLQwenImage21.

Oracle: diffusers' model at the real stage structure (5 stages, 2 residual blocks, temporal shortcuts in the
real places) but narrow (8 / 12 channels), with the random weights of `tools/checkpoints/vae21.py`, fed one
frame as its pipeline does ([B, 4, 1, H, W]); latents normalised as its `encode_vae_image` (posterior mode).
"""

from __future__ import annotations

import pytest
import torch

from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.formats.vae import load_vae
from qwen_image_core.formats.vae21 import infer_config, layout, load_vae21
from qwen_image_core.qwen21.vae import VAE21Config
from qwen_image_core.vae_tiling import Tiling
from tools.checkpoints import vae as V1
from tools.checkpoints import vae21 as W

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4  # max |ours - reference| relative to max |reference|


def close(ours, ref, tol=TOL):
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= tol * scale, f"max abs diff {err:.3g} > {tol} x scale {scale:.3g}"
    return err / scale


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae21")
    return W.write_vae21(d / "repo", "diffusers"), W.write_vae21(d / "single", "single")


@pytest.fixture(scope="module")
def vae(files):
    return load_vae21(files[0])


@pytest.fixture(scope="module")
def ref(vae):
    from diffusers import AutoencoderKLQwenImage21

    m = AutoencoderKLQwenImage21(**W.diffusers_config(vae.cfg)).eval()
    m.load_state_dict(_bf16(vae.cfg), strict=True)
    return m


def _bf16(cfg):
    return {k: v.to(torch.bfloat16).float() for k, v in W.random_weights(cfg).items()}  # what the file holds


def stats(cfg):
    return (torch.tensor(cfg.latents_mean).view(1, -1, 1, 1), torch.tensor(cfg.latents_std).view(1, -1, 1, 1))


def rgba(b, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 4, h, w, generator=g) * 2 - 1
    x[:, 3, :, : w // 3] = -1.0  # fully transparent left third
    return x


def test_encode_matches_diffusers_rgba(vae, ref):
    x = rgba(2, 48, 80, 0)  # 3 x 5 latents
    with torch.no_grad():
        raw = ref.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]
    mean, std = stats(vae.cfg)
    got = vae.encode(x, tile=False)
    assert got.shape == (2, 64, 3, 5)
    close(got, (raw - mean) / std)


def test_decode_matches_diffusers_and_keeps_alpha(vae, ref):
    z = torch.randn(2, 64, 3, 4, generator=torch.Generator().manual_seed(1))
    mean, std = stats(vae.cfg)
    with torch.no_grad():
        expected = ref.decode((z * std + mean)[:, :, None]).sample[:, :, 0]
    got = vae.decode(z, tile=False)
    assert got.shape == (2, 4, 48, 64)
    assert (expected.abs() < 1).float().mean() > 0.5  # mostly not clamped: the comparison sees the network
    close(got, expected)


def test_rgb_input_gets_opaque_alpha(vae):
    x = rgba(1, 32, 32, 2)
    rgb = x[:, :3]
    assert torch.equal(
        vae.encode(rgb, tile=False), vae.encode(torch.cat([rgb, torch.ones_like(rgb[:, :1])], 1), tile=False)
    )


def test_tiled_equals_untiled_when_one_tile_covers_and_blends_otherwise(vae):
    z = torch.randn(1, 64, 6, 7, generator=torch.Generator().manual_seed(3))
    whole = vae.decode(z, tile=False)
    assert torch.equal(vae.decode(z, tile=Tiling(128, 32)), whole)  # one 8 x 8-latent tile covers 6 x 7
    tiled = vae.decode(z, tile=Tiling(64, 16))  # 4 x 4-latent tiles, 1 latent of overlap: 4 tiles
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    x = rgba(1, 96, 112, 4)
    assert torch.equal(vae.encode(x, tile=Tiling(128, 32)), vae.encode(x, tile=False))
    assert vae.encode(x, tile=Tiling(64, 16)).shape == (1, 64, 6, 7)


def test_layouts_load_the_same_weights(files, vae):
    single = load_vae21(files[1])
    assert single.cfg == vae.cfg
    for k, v in vae.state_dict().items():
        assert torch.equal(single.state_dict()[k], v), k


def test_each_family_refuses_the_other(files, tmp_path):
    with pytest.raises(CheckpointError, match="Qwen-Image-2.1 VAE"):
        load_vae(files[1])
    with pytest.raises(CheckpointError, match="Qwen-Image-2.1 VAE"):
        load_vae(files[0])
    for kind in ("comfy", "diffusers"):
        path = V1.write_vae(tmp_path / kind, kind, base_dim=8)
        with pytest.raises(CheckpointError, match="Qwen-Image v1 VAE"):
            load_vae21(path)


def test_real_size_names_shapes_and_config():
    """At the real size (meta device): our layout = diffusers' default model's tensors, read back as our defaults."""
    from diffusers import AutoencoderKLQwenImage21

    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in AutoencoderKLQwenImage21().state_dict().items()}
    assert layout(VAE21Config()) == theirs
    assert infer_config(theirs, "the real shapes", {}) == VAE21Config()


def test_auto_tiling_uses_the_2_1_estimate(vae):
    """A 512² decode needs about 1.03 GB of working memory in float32 (measured): "auto" tiles it under a 1 GiB
    budget and runs it in one pass with 2 GiB; an encode of the same size (0.30 GB) stays in one pass at 1 GiB."""
    latents = torch.empty(1, 64, 32, 32, device="meta")
    assert isinstance(vae.tiling("auto", "decode", latents, 1 << 30), Tiling)
    assert vae.tiling("auto", "decode", latents, 2 << 30) is False
    assert vae.tiling(None, "encode", torch.empty(1, 4, 512, 512, device="meta"), 1 << 30) is False
    assert vae.tiling(False, "decode", latents, 1) is False and vae.tiling(Tiling(), "decode", latents, 1) == Tiling()
