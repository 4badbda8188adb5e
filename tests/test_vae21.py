"""The Qwen-Image-2.1 VAE (64 channels, 16x, RGBA) against diffusers 0.42.1's AutoencoderKLQwenImage21.

Oracle: diffusers' model at the real stage structure (5 stages, 2 residual blocks, temporal shortcuts in the
real places) but narrow (8 / 12 channels), with the random weights of `tools/checkpoints/vae21.py`, fed one
frame as its pipeline does ([B, 4, 1, H, W]); latents normalised as its `encode_vae_image` (posterior mode).
Comfy-Org's file (ComfyUI's Wan 2.2-style names, one-frame-deep 5-D convs) loads bit-equal to the diffusers-named
one; its names are checked against ComfyUI 0.3.75's own `comfy.ldm.wan.vae2_2.WanVAE`.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.formats.vae import load_vae
from qwen_image_core.formats.vae21 import infer_config, layout, load_vae21, read_vae21
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


@pytest.fixture(scope="module")
def comfy_file(tmp_path_factory):
    return W.write_vae21(tmp_path_factory.mktemp("vae21_comfy"), "comfy")


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_comfy_layout_loads_the_same_weights(comfy_file, vae, tmp_path, prefix):
    """Comfy-Org's naming (Wan 2.2-style modules, 5-D one-frame convs) gives the diffusers-named file's weights
    bit for bit, hence its outputs."""
    path = comfy_file
    if prefix:
        path = tmp_path / "prefixed.safetensors"
        save_file({prefix + k: v for k, v in load_file(str(comfy_file)).items()}, str(path))
    ours = load_vae21(path)
    assert ours.cfg == vae.cfg
    theirs = vae.state_dict()
    assert ours.state_dict().keys() == theirs.keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    z = torch.randn(1, 64, 2, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ours.decode(z), vae.decode(z))


def test_comfy_names_are_comfyuis_wanvae(comfy_file):
    """The ComfyUI-named file's tensors are exactly ComfyUI's WanVAE (vae2_2) state dict for the 2.1 stage structure:
    0.3.75's WanVAE has no image_channels / patch_size / temporal_kernel arguments (newer ComfyUI builds the 2.1 VAE
    with 4, 1, 1), so its convs are 3 frames deep and its image convs 12 wide; everything else is equal."""
    from tools.comfy_paths import import_comfy_for_oracle  # noqa: PLC0415

    import_comfy_for_oracle()
    from comfy.ldm.wan.vae2_2 import WanVAE  # noqa: PLC0415

    cfg = VAE21Config(**W.TINY)
    with torch.device("meta"):
        model = WanVAE(dim=cfg.encoder_dim, dec_dim=cfg.decoder_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                       temperal_downsample=list(cfg.temporal_downsample))  # fmt: skip
    expected = {}
    for k, v in model.state_dict().items():
        shape = list(v.shape)
        if len(shape) == 5:
            shape[2] = 1  # temporal_kernel 1
        if k == "encoder.conv1.weight":
            shape[1] = cfg.image_channels  # image_channels 4, patch_size 1
        if k.startswith("decoder.head.2."):
            shape[0] = cfg.image_channels
        expected[k] = tuple(shape)
    with safe_open(str(comfy_file), "pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert found == expected


def test_comfy_layout_mismatches_are_named(comfy_file, tmp_path):
    sd = load_file(str(comfy_file))
    deep = dict(sd, **{"encoder.conv1.weight": sd["encoder.conv1.weight"].repeat(1, 1, 3, 1, 1)})
    save_file(deep, str(tmp_path / "deep.safetensors"))
    with pytest.raises(CheckpointError, match=r"encoder\.conv1\.weight .* 3 frames deep"):
        load_vae21(tmp_path / "deep.safetensors")
    short = {k: v for k, v in sd.items() if not k.startswith("decoder.upsamples.1.upsamples.2.")}
    save_file(short, str(tmp_path / "short.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing .* decoder\.up_blocks\.1\.resnets\.2\."):
        read_vae21(tmp_path / "short.safetensors")
    twice = dict(sd, **{"conv1.weight": sd["conv1.weight"], "quant_conv.weight": sd["conv1.weight"].clone()})
    save_file(twice, str(tmp_path / "twice.safetensors"))
    with pytest.raises(CheckpointError, match="both quant_conv.weight"):
        read_vae21(tmp_path / "twice.safetensors")


def test_wan22_own_vae_is_refused_by_name(tmp_path):
    """Wan 2.2's 48-channel VAE in ComfyUI's names (4 stages, so no `encoder.downsamples.4`) is not the 2.1 VAE."""
    from tools.comfy_paths import import_comfy_for_oracle  # noqa: PLC0415

    import_comfy_for_oracle()
    from comfy.ldm.wan.vae2_2 import WanVAE  # noqa: PLC0415

    with torch.device("meta"):
        keys = WanVAE(dim=4, dec_dim=4, z_dim=48).state_dict().keys()
    save_file({k: torch.zeros(1) for k in keys}, str(tmp_path / "wan2.2_vae.safetensors"))
    with pytest.raises(CheckpointError, match="Wan 2.2's own VAE"):
        load_vae21(tmp_path / "wan2.2_vae.safetensors")
    with pytest.raises(CheckpointError, match="Wan 2.2 VAE"):
        load_vae(tmp_path / "wan2.2_vae.safetensors")


def test_each_family_refuses_the_other(files, comfy_file, tmp_path):
    with pytest.raises(CheckpointError, match="Qwen-Image-2.1 VAE"):
        load_vae(files[1])
    with pytest.raises(CheckpointError, match="Qwen-Image-2.1 VAE"):
        load_vae(files[0])
    with pytest.raises(CheckpointError, match="Qwen-Image-2.1 VAE"):
        load_vae(comfy_file)
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
