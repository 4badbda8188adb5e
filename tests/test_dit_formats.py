"""DiT checkpoint layouts (ComfyUI single files, float8, scaled fp8, mixed precision, diffusers folders) load
to the same model as diffusers' reference on the dequantized weights; float8 stays float8; bad files fail clearly."""

from __future__ import annotations

import gc
import json
import os

import psutil
import pytest
import torch

from oracles import assert_close, diffusers_dit, diffusers_velocity, inputs
from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.mmdit import MMDiTConfig, load_dit
from tools.checkpoints import dit as W

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
CFG = W.tiny_config()

LAYOUTS = {
    "comfy-bf16": lambda p: W.write_comfy(p / "f.safetensors", CFG),
    "comfy-fp16-prefixed": lambda p: W.write_comfy(p / "f.safetensors", CFG, dtype=torch.float16, prefix=W.PREFIX),
    "fp8-e4m3fn": lambda p: W.write_fp8(p / "f.safetensors", CFG),
    "fp8-e5m2-prefixed": lambda p: W.write_fp8(p / "f.safetensors", CFG, fp8=E5M2, prefix=W.PREFIX),
    "scaled-fp8": lambda p: W.write_scaled_fp8(p / "f.safetensors", CFG),
    "scaled-fp8-e5m2-noprefix": lambda p: W.write_scaled_fp8(p / "f.safetensors", CFG, fp8=E5M2, prefix=""),
    "mixed-metadata": lambda p: W.write_mixed(p / "f.safetensors", CFG, prefix=W.PREFIX),
    "mixed-comfy-quant-e5m2": lambda p: W.write_mixed(p / "f.safetensors", CFG, fp8=E5M2, comfy_quant=True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_single_file_layouts_match_reference_on_dequantized_weights(tmp_path, layout):
    path = LAYOUTS[layout](tmp_path)
    model = load_dit(path)
    ref = diffusers_dit(CFG, W.dequantized(path))
    img, sigma, txt = inputs(h=8, w=10, seed=7)
    with torch.no_grad():
        assert_close(model(img, sigma, txt), diffusers_velocity(ref, img, sigma, txt))
    to_q = model.transformer_blocks[1].attn.to_q
    fp8 = {"fp8-e4m3fn": E4M3, "scaled-fp8": E4M3, "mixed-metadata": E4M3}.get(
        layout, E5M2 if "e5m2" in layout else None
    )
    if fp8 is not None:  # float8 weights stay float8 in memory; scales are attached where the file has them
        assert to_q.weight.dtype == fp8
        assert (to_q.weight_scale is not None) == ("scaled" in layout or "mixed" in layout)
        assert model.transformer_blocks[0].attn.norm_q.weight.dtype == torch.bfloat16
    else:
        assert to_q.weight.dtype in (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("repo", [False, True], ids=["transformer-folder", "repo-folder"])
def test_diffusers_sharded_folder(tmp_path, repo):
    folder = W.write_diffusers(tmp_path / "qwen", CFG, repo=repo)
    assert len(list((folder / "transformer" if repo else folder).glob("*.safetensors"))) == 2
    model = load_dit(folder)
    assert model.config == CFG and not model.zero_cond_t
    sd = {k: v.to(torch.bfloat16).float() for k, v in W.state_dict(CFG).items()}
    img, sigma, txt = inputs(seed=8)
    with torch.no_grad():
        assert_close(model(img, sigma, txt), diffusers_velocity(diffusers_dit(CFG, sd), img, sigma, txt))


def test_compute_dtype_comes_from_the_input(tmp_path):
    """bf16 storage computes in float32 for float32 latents (nothing rounded to bf16), in bf16 for bf16 ones."""
    m = load_dit(W.write_comfy(tmp_path / "a.safetensors", CFG))  # bf16 storage
    ref = load_dit(W.write_comfy(tmp_path / "c.safetensors", CFG, dtype=torch.float32))
    for layer in (*ref.modules(),):  # the same weights, rounded to bf16, stored in float32
        for name, p in list(layer.named_parameters(recurse=False)):
            setattr(layer, name, torch.nn.Parameter(p.to(torch.bfloat16).float(), requires_grad=False))
    img, sigma, txt = inputs()
    with torch.no_grad():
        assert torch.equal(m(img, sigma, txt), ref(img, sigma, txt))
        out16 = m(img.bfloat16(), sigma, txt.bfloat16())
    assert out16.dtype == torch.bfloat16
    assert m(img.double(), sigma, txt.double()).dtype == torch.float64


@pytest.mark.parametrize("mmap", [False, True], ids=["copied", "mmap"])
def test_fp8_file_stays_fp8_in_memory(tmp_path, mmap):
    """A 6-block, 1024-wide fp8 file. Copied (default): loading reads it once into memory (RSS grows by ~1x its
    size, not 2x), a forward adds little. mmap=True: loading maps it (RSS grows by a fraction), a forward
    touches every weight once. Either way weights upcast one layer at a time (RSS ~1.2x the file, not 2-4x)."""
    cfg = MMDiTConfig(num_layers=6, num_heads=8, head_dim=128, mlp_dim=4096, text_dim=1024)
    path = W.write_fp8(tmp_path / "mid_fp8.safetensors", cfg)
    size = path.stat().st_size
    gc.collect()
    proc = psutil.Process(os.getpid())
    before = proc.memory_info().rss
    model = load_dit(path, mmap=mmap)
    after_load = proc.memory_info().rss
    fp8_bytes = sum(p.numel() for p in model.parameters() if p.dtype == E4M3)
    assert fp8_bytes > 0.95 * size
    assert all(b.attn.to_q.weight.dtype == E4M3 for b in model.transformer_blocks)
    img, sigma, txt = inputs(h=8, w=8, text_dim=1024)
    with torch.no_grad():
        assert torch.isfinite(model(img, sigma, txt)).all()
    after_forward = proc.memory_info().rss
    grown = (after_load - before) / size
    assert grown < (0.15 if mmap else 1.15), f"load grew RSS by {grown:.2f} x file size"
    # ~1.0x for the weights plus activations and one upcast layer; a model upcast to bf16 would be >= 2x
    assert after_forward - before < 1.5 * size, f"forward grew RSS by {(after_forward - before) / size:.2f} x file size"


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


def fake_file(path, keys: dict[str, tuple[int, ...]], prefix=""):
    entries = [(prefix + k, s, torch.bfloat16, lambda s=s: torch.zeros(s)) for k, s in keys.items()]
    return W.write_safetensors(path, entries)


FLUX = {"double_blocks.0.img_attn.qkv.weight": (9, 3), "img_in.weight": (3, 4), "txt_in.weight": (3, 4)}
SDXL = {"input_blocks.0.0.weight": (4, 4, 3, 3), "time_embed.0.weight": (8, 4), "out.2.weight": (4, 4, 3, 3)}
WAN_VAE = {
    "encoder.conv1.weight": (4, 3, 3, 3, 3),
    "decoder.conv1.weight": (4, 4, 3, 3, 3),
    "conv1.weight": (8, 8, 1, 1, 1),
}


@pytest.mark.parametrize(
    "name,keys,prefix,expected",
    [
        ("flux.safetensors", FLUX, W.PREFIX, "Flux"),
        ("sdxl.safetensors", SDXL, W.PREFIX, "Stable Diffusion"),
        ("qwen_image_vae.safetensors", WAN_VAE, "", "VAE"),
        ("random.safetensors", {"a.weight": (2, 2)}, "", "lacks txt_norm.weight"),
    ],
)
def test_other_families_are_refused(tmp_path, name, keys, prefix, expected):
    path = fake_file(tmp_path / name, keys, prefix)
    with pytest.raises(CheckpointError, match="not a Qwen-Image") as e:
        load_dit(path)
    assert str(path) in str(e.value) and expected in str(e.value)


def test_truncated_file(tmp_path):
    path = W.write_comfy(tmp_path / "cut.safetensors", CFG)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_dit(path)
    assert str(path) in str(e.value)


def _rewrite(tmp_path, change):
    sd = {k: v.to(torch.bfloat16) for k, v in W.state_dict(CFG).items()}
    change(sd)
    path = tmp_path / "bad.safetensors"
    entries = [(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in sd.items()]
    return W.write_safetensors(path, entries, W.config_metadata(CFG))


def test_wrong_shape_missing_and_unexpected_keys(tmp_path):
    key = "transformer_blocks.1.attn.to_k.weight"
    path = _rewrite(tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(96, 95)))
    with pytest.raises(CheckpointError, match=r"wrong shapes: transformer_blocks\.1\.attn\.to_k\.weight") as e:
        load_dit(path)
    assert str(path) in str(e.value) and "[96, 95]" in str(e.value)
    path = _rewrite(tmp_path, lambda sd: sd.pop("transformer_blocks.0.txt_mlp.net.2.bias"))
    with pytest.raises(CheckpointError, match=r"missing 1 keys: transformer_blocks\.0\.txt_mlp\.net\.2\.bias"):
        load_dit(path)
    path = _rewrite(tmp_path, lambda sd: sd.__setitem__("transformer_blocks.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected 1 keys: transformer_blocks\.0\.extra\.weight"):
        load_dit(path)


def test_unsupported_variants_and_inconsistent_quantization(tmp_path):
    # Qwen-Image-Layered's extra embedding (issue 16) now reads as that model; a wrong shape is still named
    path = _rewrite(
        tmp_path, lambda sd: sd.__setitem__("time_text_embed.addition_t_embedding.weight", torch.zeros(2, 96))
    )
    assert load_dit(path).config.layer3d_rope and load_dit(path).config.additional_t_cond
    path = _rewrite(
        tmp_path, lambda sd: sd.__setitem__("time_text_embed.addition_t_embedding.weight", torch.zeros(3, 96))
    )
    with pytest.raises(CheckpointError, match=r"wrong shapes: time_text_embed\.addition_t_embedding\.weight"):
        load_dit(path)
    path = _rewrite(
        tmp_path, lambda sd: sd.__setitem__("time_text_embed.guidance_embedder.linear_1.weight", torch.zeros(2, 96))
    )
    with pytest.raises(CheckpointError, match="guidance-distilled"):
        load_dit(path)
    folder = W.write_diffusers(tmp_path / "other", CFG)
    conf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**conf, "_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(CheckpointError, match="FluxTransformer2DModel"):
        load_dit(folder)
    mixed = W.write_mixed(tmp_path / "mixed.safetensors", CFG)
    sd = {k: v for k, v in W.dequantized(mixed).items()}  # all weights now float32, metadata still says fp8
    meta = {
        "_quantization_metadata": json.dumps(
            {"layers": {"transformer_blocks.0.attn.to_q": {"format": "float8_e4m3fn"}}}
        )
    }
    bad = W.write_safetensors(
        tmp_path / "liar.safetensors",
        [(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in sd.items()],
        W.config_metadata(CFG, meta),
    )
    with pytest.raises(CheckpointError, match="declared float8_e4m3fn but its weight is stored as torch.float32"):
        load_dit(bad)
    scaled = tmp_path / "noscale.safetensors"
    W.write_scaled_fp8(scaled, CFG)
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    sd = load_file(str(scaled))
    del sd[W.PREFIX + "transformer_blocks.0.attn.to_v.scale_weight"]
    save_file(sd, str(scaled), W.config_metadata(CFG))
    with pytest.raises(CheckpointError, match=r"to_v\.weight has no scale"):
        load_dit(scaled)
