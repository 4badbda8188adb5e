"""LoRA files in the three real formats give diffusers' fused weights; removal restores the base exactly."""

from __future__ import annotations

import pytest
import torch

from oracles import diffusers_fused
from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.lora import effective_weight, load_lora, loras_applied
from qwen_image_core.mmdit import load_dit
from tools.checkpoints import dit as W
from tools.checkpoints.lora import FORMATS, write_lora


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = W.tiny_config()
    path = W.write_comfy(tmp_path_factory.mktemp("dit") / "tiny.safetensors", cfg, dtype=torch.float32)
    return cfg, load_dit(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_formats_match_diffusers_loader(tiny, tmp_path, fmt):
    cfg, model = tiny
    path = write_lora(tmp_path / f"{fmt}.safetensors", cfg, fmt, rank=4, alpha=8.0)
    ref = diffusers_fused(cfg, path, strength=0.7)
    layers = dict(model.named_modules())
    base = {name: effective_weight(layers[name]) for name in ref}
    assert all((ref[n] - base[n]).abs().max() > 1e-3 for n in ref), "diffusers did not apply the LoRA"
    with loras_applied(model, [(load_lora(path, model), 0.7)]):
        for name, want in ref.items():
            got = effective_weight(layers[name])
            assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), (
                f"{fmt}: {name} differs by {(got - want).abs().max()}"
            )


def test_removal_restores_base_bit_exactly_and_loras_stack(tiny, tmp_path):
    cfg, model = tiny
    a = load_lora(write_lora(tmp_path / "a.safetensors", cfg, "kohya", seed=1), model)
    b = load_lora(write_lora(tmp_path / "b.safetensors", cfg, "peft", seed=2), model)
    layer = model.transformer_blocks[0].attn.to_q
    base, ptr = layer.weight.clone(), layer.weight.data_ptr()
    with loras_applied(model, [(a, 1.0)]):
        wa = effective_weight(layer) - base
    with loras_applied(model, [(b, 0.5)]):
        wb = effective_weight(layer) - base
    with loras_applied(model, [(a, 1.0), (b, 0.5)]):
        assert torch.allclose(effective_weight(layer) - base, wa + wb, atol=1e-6)
    assert layer.lora == () and layer.weight.data_ptr() == ptr and torch.equal(layer.weight, base)
    assert torch.equal(effective_weight(layer), base)


def test_patched_forward_equals_fused_weights(tiny, tmp_path):
    cfg, model = tiny
    lora = load_lora(write_lora(tmp_path / "l.safetensors", cfg, "lightx2v"), model)
    g = torch.Generator().manual_seed(0)
    img, sigma, txt = (
        torch.randn(1, 16, 8, 8, generator=g),
        torch.tensor([0.6]),
        torch.randn(1, 5, cfg.text_dim, generator=g),
    )
    with torch.no_grad(), loras_applied(model, [(lora, 0.8)]):
        patched = model(img, sigma, txt)
        fused = {n: effective_weight(m) for n, m in model.named_modules() if hasattr(m, "lora") and m.lora}
    ref = load_dit(model.path)
    mods = dict(ref.named_modules())
    for n, w in fused.items():
        mods[n].weight = torch.nn.Parameter(w, requires_grad=False)
    with torch.no_grad():
        assert torch.allclose(patched, ref(img, sigma, txt), atol=1e-5, rtol=1e-5)


def test_lora_on_fp8_base_is_exact_in_float32(tmp_path):
    cfg = W.tiny_config()
    model = load_dit(W.write_scaled_fp8(tmp_path / "fp8.safetensors", cfg))
    lora = load_lora(write_lora(tmp_path / "l.safetensors", cfg, "lightx2v", rank=4, alpha=4.0), model)
    layer = model.transformer_blocks[1].img_mlp.net[0].proj
    assert layer.weight.dtype == torch.float8_e4m3fn
    f = next(f for f in lora.factors if f.module == "transformer_blocks.1.img_mlp.net.0.proj")
    want = layer.weight.float() * layer.weight_scale.float() + 1.0 * (f.up.float() @ f.down.float())
    with loras_applied(model, [(lora, 1.0)]):
        assert torch.equal(effective_weight(layer), want)
    assert layer.weight.dtype == torch.float8_e4m3fn  # the base stays fp8


def test_mismatched_lora_is_a_clear_error(tiny, tmp_path):
    cfg, model = tiny
    other = W.tiny_config(head_dim=16, rope_axes=(4, 6, 6), mlp_dim=192)  # a LoRA made for another width
    with pytest.raises(CheckpointError, match="made for another model"):
        load_lora(write_lora(tmp_path / "wide.safetensors", other, "kohya"), model)
    from safetensors.torch import save_file

    save_file({"unet.down.0.lora_down.weight": torch.zeros(2, 3)}, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(CheckpointError, match="not a LoRA for this Qwen-Image DiT"):
        load_lora(tmp_path / "sdxl.safetensors", model)
