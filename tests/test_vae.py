"""Image VAE: parity with diffusers' AutoencoderKLQwenImage and ComfyUI 0.3.75's WanVAE (3D networks run on
one frame), dtypes, the RGBA variant, odd sizes, latent normalisation, previews, and tiling.

Loader detection and errors are in test_vae_formats.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qwen_image_core.formats.vae import layout, load_vae
from qwen_image_core.vae import (
    LATENT_RGB_BIAS,
    LATENT_RGB_FACTORS,
    ImageVAE,
    VAEConfig,
    denormalize_latents,
    latent_preview,
    normalize_latents,
)
from qwen_image_core.vae_tiling import Tiling, choose_tiling, estimate_bytes, tile_starts
from tools.checkpoints.vae import random_vae_weights, write_vae

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread

TOL = 1e-4  # max abs difference allowed against the references (float32)


def diffusers_vae(weights: dict, cfg: VAEConfig):
    from diffusers import AutoencoderKLQwenImage

    with torch.device("meta"):
        model = AutoencoderKLQwenImage(base_dim=cfg.base_dim, input_channels=cfg.image_channels)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, assign=True)
    return model.eval()


def comfy_vae(weights: dict, cfg: VAEConfig):
    from tools.comfy_paths import import_comfy_for_oracle

    import_comfy_for_oracle()
    from comfy.ldm.wan.vae import WanVAE

    wan = {d: w for d, w, _ in layout(cfg)}
    with torch.device("meta"):
        model = WanVAE(dim=cfg.base_dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                       temperal_downsample=[False, True, True])  # fmt: skip
    model.load_state_dict({wan[k]: v.float() for k, v in weights.items()}, assign=True)
    return model.eval()


def images(b, h, w, c=3, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latents(b, h, w, seed=1):
    return torch.randn(b, 16, h, w, generator=torch.Generator().manual_seed(seed))


def check_parity(ours, ref_d, ref_c, x, z):
    """encode (mean) and decode of ours vs the references, on raw and normalised latents."""
    with torch.no_grad():
        mean_d = ref_d.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]
        dec_d = ref_d.decode(z[:, :, None]).sample[:, :, 0]  # clamped to [-1, 1]
        mean_c = ref_c.encode(x[:, :, None])[:, :, 0] if ref_c else None
        dec_c = ref_c.decode(z[:, :, None])[:, :, 0] if ref_c else None  # not clamped
    assert (dec_d.abs() < 1).float().mean() > 0.9  # mostly unclamped: the comparison is not trivial
    enc = ours.encode(x)
    assert enc.shape == (x.shape[0], 16, x.shape[2] // 8, x.shape[3] // 8)
    assert (enc - ours.normalize(mean_d)).abs().max() <= TOL
    assert (ours.decode(ours.normalize(z)) - dec_d).abs().max() <= TOL
    if ref_c is not None:
        assert (ours.denormalize(enc) - mean_c).abs().max() <= TOL
        with torch.no_grad():
            raw = ours.decode_raw(z.contiguous(memory_format=torch.channels_last))
        assert (raw - dec_c).abs().max() <= TOL


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real config (126.9M parameters), random bf16 weights in both layouts."""
    folder = tmp_path_factory.mktemp("vae_real")
    cfg = VAEConfig()
    comfy = write_vae(folder / "comfy", "comfy", dtype=torch.bfloat16, seed=3)
    diffusers = write_vae(folder / "diffusers", "diffusers", dtype=torch.bfloat16, seed=3)
    weights = load_file(str(diffusers / "vae" / "diffusion_pytorch_model.safetensors"))
    return cfg, comfy, diffusers, weights


def test_layout_matches_both_references():
    cfg = VAEConfig(base_dim=8)
    rows = layout(cfg)
    d_shapes = {k: tuple(v.shape) for k, v in diffusers_vae(random_vae_weights(cfg), cfg).state_dict().items()}
    c_shapes = {k: tuple(v.shape) for k, v in comfy_vae(random_vae_weights(cfg), cfg).state_dict().items()}
    assert d_shapes == {d: s for d, _, s in rows}
    assert c_shapes == {w: s for _, w, s in rows}
    real_rows = layout(VAEConfig())
    assert len(real_rows) == 194 and len({w for _, w, _ in real_rows}) == 194
    assert sum(torch.Size(s).numel() for *_, s in real_rows) == 126_892_531


def test_parity_real_config_64px(real):
    cfg, comfy_path, diffusers_path, weights = real
    ours = load_vae(comfy_path)
    assert ours.encoder.conv_in.weight.dtype == torch.bfloat16  # weights keep the file's dtype
    assert sum(p.numel() for p in ours.parameters()) < 126_892_531 / 2  # 2D slices of the 3D weights
    check_parity(ours, diffusers_vae(weights, cfg), comfy_vae(weights, cfg), images(1, 64, 64), latents(1, 8, 8))
    other = load_vae(diffusers_path)
    x = images(1, 64, 64, seed=5)
    assert torch.equal(other.encode(x), ours.encode(x))


@pytest.mark.parametrize("kind", ["comfy", "diffusers"])
def test_parity_tiny_sizes_batch2(tmp_path, kind):
    cfg = VAEConfig(base_dim=8)
    ours = load_vae(write_vae(tmp_path, kind, base_dim=8, dtype=torch.float32, seed=7))
    weights = random_vae_weights(cfg, seed=7)
    ref_d, ref_c = diffusers_vae(weights, cfg), comfy_vae(weights, cfg)
    for h, w in ((8, 8), (24, 40), (72, 56)):
        check_parity(ours, ref_d, ref_c, images(2, h, w), latents(2, h // 8, w // 8))


def test_sampling_matches_diffusers(tmp_path):
    cfg = VAEConfig(base_dim=8)
    ours = load_vae(write_vae(tmp_path, "comfy", base_dim=8, dtype=torch.float32))
    ref = diffusers_vae(random_vae_weights(cfg), cfg)
    x = images(2, 32, 48)
    with torch.no_grad():
        want = ref.encode(x[:, :, None]).latent_dist.sample(torch.Generator().manual_seed(11))[:, :, 0]
    got = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(11))
    assert (got - ours.normalize(want)).abs().max() <= TOL
    assert not torch.allclose(got, ours.encode(x), atol=1e-3)  # a sample differs from the mean


@pytest.mark.parametrize("kind", ["comfy", "diffusers"])
def test_rgba_variant(tmp_path, kind):
    cfg = VAEConfig(base_dim=8, image_channels=4)
    ours = load_vae(write_vae(tmp_path, kind, base_dim=8, image_channels=4, dtype=torch.float32))
    assert ours.cfg.image_channels == 4
    check_parity(ours, diffusers_vae(random_vae_weights(cfg), cfg), None, images(2, 32, 24, c=4), latents(2, 4, 3))
    assert ours.decode(latents(1, 4, 4)).shape == (1, 4, 32, 32)
    with pytest.raises(ValueError, match="4-channel"):
        ours.encode(images(1, 32, 32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_file_dtypes_and_compute_dtypes(tmp_path, dtype):
    cfg = VAEConfig(base_dim=8)
    ours = load_vae(write_vae(tmp_path, "comfy", base_dim=8, dtype=dtype))
    assert {p.dtype for p in ours.parameters()} == {dtype}
    weights = {k: v.to(dtype) for k, v in random_vae_weights(cfg).items()}
    x, z = images(1, 32, 32), latents(1, 4, 4)
    check_parity(ours, diffusers_vae(weights, cfg), comfy_vae(weights, cfg), x, z)
    for compute in (torch.bfloat16, torch.float16):  # compute dtype follows the input
        enc, dec = ours.encode(x.to(compute)), ours.decode(z.to(compute))
        assert enc.dtype == dec.dtype == compute
        assert (enc.float() - ours.encode(x)).abs().max() < 0.1
        assert (dec.float() - ours.decode(z)).abs().max() < 0.1


def test_normalisation_is_the_per_channel_affine_map():
    vae = ImageVAE(VAEConfig(base_dim=8))
    raw = latents(2, 3, 5)
    mean = torch.tensor(VAEConfig().latents_mean).view(1, 16, 1, 1)
    std = torch.tensor(VAEConfig().latents_std).view(1, 16, 1, 1)
    assert mean[0, 7, 0, 0].item() == pytest.approx(1.5508) and std[0, 8, 0, 0].item() == pytest.approx(3.2687)
    assert torch.allclose(vae.normalize(raw), (raw - mean) / std)
    assert torch.allclose(vae.denormalize(vae.normalize(raw)), raw, atol=1e-6)
    assert vae.normalize(raw.double()).dtype == torch.float64
    assert torch.equal(normalize_latents(raw), vae.normalize(raw))
    assert torch.equal(denormalize_latents(raw), vae.denormalize(raw))


def test_odd_sizes_pad_right_bottom_by_replication(tmp_path):
    ours = load_vae(write_vae(tmp_path, "comfy", base_dim=8, dtype=torch.float32))
    x = images(2, 37, 50)
    enc = ours.encode(x)
    assert enc.shape == (2, 16, 5, 7)  # ceil(37/8), ceil(50/8)
    padded = torch.nn.functional.pad(x, (0, 6, 0, 3), mode="replicate")
    assert torch.equal(enc, ours.encode(padded))
    dec = ours.decode(enc)
    assert dec.shape == (2, 3, 40, 56)  # crop [..., :37, :50] for the original size
    for h, w in ((1, 1), (7, 9), (8, 17)):
        assert ours.decode(ours.encode(images(1, h, w))).shape == (1, 3, -(-h // 8) * 8, -(-w // 8) * 8)


def test_latent_preview():
    z = latents(2, 3, 4)
    rgb = latent_preview(z)
    assert rgb.shape == (2, 3, 3, 4) and rgb.abs().max() <= 1
    want = sum(z[1, c, 2, 3] * LATENT_RGB_FACTORS[c][1] for c in range(16)) + LATENT_RGB_BIAS[1]
    assert rgb[1, 1, 2, 3].item() == pytest.approx(max(-1.0, min(1.0, want.item())), abs=1e-5)
    assert latent_preview(torch.zeros(1, 16, 1, 1))[0, :, 0, 0].tolist() == pytest.approx(list(LATENT_RGB_BIAS))


# --- tiling ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_vae(write_vae(tmp_path_factory.mktemp("vae_tiny"), "comfy", base_dim=8, dtype=torch.float32, seed=9))


def test_tile_starts_cover_with_at_least_the_overlap():
    for length, tile, overlap in ((10, 16, 4), (16, 16, 4), (17, 16, 4), (40, 16, 4), (100, 32, 8), (33, 8, 0)):
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + min(tile, length) == length
        assert all(0 < b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def blend_range(per_tile, shape):
    """Per-pixel min and max over the tiles covering it, and how many tiles cover it."""
    lo, hi = torch.full(shape, torch.inf), torch.full(shape, -torch.inf)
    count = torch.zeros(shape[-2:])
    for region, y in per_tile:
        lo[region], hi[region] = torch.minimum(lo[region], y), torch.maximum(hi[region], y)
        count[region[-2:]] += 1
    return lo, hi, count


def check_blend_bound(tiled, untiled, per_tile):
    """The stated bound: every tiled value is a convex combination of the values of the tiles covering
    that pixel (exactly the tile's value where one tile covers it), so |tiled - untiled| is at most the
    largest |tile - untiled| among them."""
    lo, hi, count = blend_range(per_tile, tiled.shape)
    assert count.min() >= 1 and count.max() >= 4  # full cover, with corners where four tiles meet
    assert (tiled >= lo - 1e-5).all() and (tiled <= hi + 1e-5).all()
    assert (tiled - lo)[..., count == 1].abs().max() <= 1e-5
    bound = torch.maximum((hi - untiled).abs(), (lo - untiled).abs())
    assert ((tiled - untiled).abs() <= bound + 1e-5).all()


def test_tiled_decode_is_a_blend_of_its_tiles(tiny):
    z, plan = latents(2, 20, 28), Tiling(64, 16)  # latent tiles of 8 overlapping by 2
    tiled, untiled = tiny.decode(z, tile=plan), tiny.decode(z, tile=False)
    raw = tiny.denormalize(z)
    per_tile = []
    for r in tile_starts(20, 8, 2):
        for c in tile_starts(28, 8, 2):
            with torch.no_grad():
                y = tiny.decode_raw(raw[..., r : r + 8, c : c + 8].contiguous(memory_format=torch.channels_last))
            per_tile.append(((..., slice(8 * r, 8 * r + 64), slice(8 * c, 8 * c + 64)), y.clamp(-1, 1)))
    check_blend_bound(tiled, untiled, per_tile)
    assert torch.equal(tiny.decode(z, tile=Tiling(256, 64)), untiled)  # one tile is the untiled pass


def test_tiled_encode_is_a_blend_of_its_tiles(tiny):
    x, plan = images(2, 160, 224), Tiling(64, 16)
    tiled, untiled = tiny.encode(x, tile=plan), tiny.encode(x, tile=False)
    per_tile = []
    for r in tile_starts(20, 8, 2):
        for c in tile_starts(28, 8, 2):
            y = tiny.encode(x[..., 8 * r : 8 * r + 64, 8 * c : 8 * c + 64], tile=False)
            per_tile.append(((..., slice(r, r + 8), slice(c, c + 8)), y))
    check_blend_bound(tiled, untiled, per_tile)


def test_auto_tiling_follows_the_memory_budget(tiny):
    cfg, z = VAEConfig(), torch.zeros(1, 16, 128, 128)  # a 1024² decode at the real width
    need = estimate_bytes("decode", cfg, 1, 1024 * 1024, torch.float32)
    assert choose_tiling(None, "decode", z, cfg, need) is None
    plan = choose_tiling("auto", "decode", z, cfg, need // 5)
    assert 128 <= plan.size < 1024 and plan.size % 64 == 0 and plan.overlap == plan.size // 4 // 16 * 16
    assert estimate_bytes("decode", cfg, 1, plan.size**2, torch.float32) <= need // 5
    assert estimate_bytes("decode", cfg, 1, (plan.size + 64) ** 2, torch.float32) > need // 5
    assert estimate_bytes("decode", cfg, 1, 1, torch.bfloat16) * 2 == estimate_bytes("decode", cfg, 1, 1, torch.float32)
    assert choose_tiling(False, "decode", z, cfg, 1) is None
    assert choose_tiling(Tiling(256, 64), "decode", z, cfg, None) == Tiling(256, 64)
    with pytest.raises(ValueError):
        choose_tiling("yes", "decode", z, cfg, None)
    for bad in ((100, 8), (64, 40), (64, -8)):
        with pytest.raises(ValueError):
            Tiling(*bad)
    small = latents(1, 24, 24)  # 192² px with a budget that only fits 128² tiles
    budget = estimate_bytes("decode", tiny.cfg, 1, 128 * 128, torch.float32)
    assert choose_tiling(None, "decode", small, tiny.cfg, budget) == Tiling(128, 32)
    assert torch.equal(tiny.decode(small, budget=budget), tiny.decode(small, tile=Tiling(128, 32)))


MEMORY_PROBE = """
import sys, torch
from pathlib import Path
from qwen_image_core.formats.vae import load_vae
def rss(field):
    lines = Path("/proc/self/status").read_text().split("\\n")
    return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))
torch.set_num_threads(1)
vae, budget = load_vae(sys.argv[1]), int(sys.argv[2])
vae.decode(torch.randn(1, 16, 40, 40), budget=budget)  # warm-up
z = torch.randn(1, 16, 256, 256, generator=torch.Generator().manual_seed(0))
before = rss("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # reset the peak mark
out = vae.decode(z, budget=budget)
print(rss("VmHWM") - before, tuple(out.shape))
"""


def test_tiled_2048_decode_peak_memory(tmp_path):
    """Stated bound: a tiled decode's working memory (peak RSS minus RSS before) stays within the
    budget plus 2.5x the float32 output (blend accumulator, weight map, the result) plus 32 MiB."""
    import os
    import subprocess
    import sys

    from tools.comfy_paths import ROOT

    path = write_vae(tmp_path, "comfy", base_dim=16, dtype=torch.float32)
    cfg, budget = VAEConfig(base_dim=16), 128 << 20
    assert estimate_bytes("decode", cfg, 1, 2048 * 2048, torch.float32) > 4 * budget  # untiled would not fit
    # glibc's dynamic mmap threshold would serve later large tensors from the heap, whose freed pages stay in RSS,
    # so the peak would count memory no tensor holds (it varied 250-330 MiB between runs): fix the threshold
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    run = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(budget)], capture_output=True, text=True,
                         cwd=ROOT, check=True, env=env)  # fmt: skip
    work, shape = run.stdout.split(maxsplit=1)
    assert shape.strip() == "(1, 3, 2048, 2048)"
    output = 3 * 2048 * 2048 * 4
    assert int(work) <= budget + 2.5 * output + (32 << 20), f"{int(work) / 2**20:.0f} MiB"
