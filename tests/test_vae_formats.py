"""VAE checkpoint formats: both namings, folders, prefixes, the rename table, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.formats.vae import WAN22_MARKER, image_weights, layout, load_vae, wan_to_diffusers
from qwen_image_core.vae import VAEConfig
from tools.checkpoints.vae import write_vae


def test_rename_table_is_a_bijection_with_the_facts_sheet_examples():
    for cfg in (VAEConfig(), VAEConfig(base_dim=8, image_channels=4)):
        rows = layout(cfg)
        assert len({d for d, _, _ in rows}) == len({w for _, w, _ in rows}) == len(rows)
        assert all(wan_to_diffusers(w) == d for d, w, _ in rows)
    examples = {
        "encoder.conv1.weight": "encoder.conv_in.weight",
        "encoder.downsamples.3.residual.2.weight": "encoder.down_blocks.3.conv1.weight",
        "encoder.downsamples.3.shortcut.bias": "encoder.down_blocks.3.conv_shortcut.bias",
        "encoder.downsamples.5.time_conv.weight": "encoder.down_blocks.5.time_conv.weight",
        "encoder.middle.1.to_qkv.weight": "encoder.mid_block.attentions.0.to_qkv.weight",
        "decoder.middle.2.residual.3.gamma": "decoder.mid_block.resnets.1.norm2.gamma",
        "encoder.head.2.weight": "encoder.conv_out.weight",
        "conv1.weight": "quant_conv.weight",
        "conv2.bias": "post_quant_conv.bias",
        "decoder.upsamples.3.resample.1.weight": "decoder.up_blocks.0.upsamplers.0.resample.1.weight",
        "decoder.upsamples.4.shortcut.weight": "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
        "decoder.upsamples.11.resample.1.bias": "decoder.up_blocks.2.upsamplers.0.resample.1.bias",
        "decoder.upsamples.14.residual.6.weight": "decoder.up_blocks.3.resnets.2.conv2.weight",
        "decoder.head.0.gamma": "decoder.norm_out.gamma",
    }
    assert {k: wan_to_diffusers(k) for k in examples} == examples


def test_image_weights_keep_the_last_temporal_tap():
    w = torch.randn(4, 3, 3, 3, 3)
    out = image_weights(
        {"a.weight": w, "b.time_conv.weight": torch.randn(8, 4, 3, 1, 1), "n.gamma": torch.ones(4, 1, 1, 1)}
    )
    assert set(out) == {"a.weight", "n.gamma"}
    assert torch.equal(out["a.weight"], w[:, :, 2]) and out["a.weight"].is_contiguous(memory_format=torch.channels_last)
    assert out["n.gamma"].shape == (4, 1, 1)


def test_all_three_places_load_the_same_weights(tmp_path):
    repo = write_vae(tmp_path / "repo", "diffusers", base_dim=8, dtype=torch.float16, seed=4)
    comfy = write_vae(tmp_path / "comfy", "comfy", base_dim=8, dtype=torch.float16, seed=4)
    ref = load_vae(comfy).state_dict()
    for path in (repo, repo / "vae", repo / "vae" / "diffusion_pytorch_model.safetensors"):
        sd = load_vae(path).state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)


def test_diffusers_config_latent_stats_are_used(tmp_path):
    repo = write_vae(tmp_path, "diffusers", base_dim=8)
    config_path = repo / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["latents_mean"] = [0.5] * 16
    config_path.write_text(json.dumps(config))
    vae = load_vae(repo)
    assert vae.cfg.latents_mean == (0.5,) * 16
    assert load_vae(repo / "vae" / "diffusion_pytorch_model.safetensors").cfg.latents_mean == (0.5,) * 16
    assert vae.cfg.latents_std == VAEConfig().latents_std
    assert load_vae(write_vae(tmp_path / "c", "comfy", base_dim=8)).cfg.latents_mean == VAEConfig().latents_mean


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae."])
def test_prefixed_vae_inside_a_bigger_file_loads(tmp_path, prefix):
    path = write_vae(tmp_path, "comfy", base_dim=8)
    sd = {prefix + k: v for k, v in load_file(str(path)).items()}
    others = {f"model.diffusion_model.blocks.{i}.weight": torch.zeros(2, dtype=torch.float8_e4m3fn) for i in range(300)}
    save_file(sd | others, str(tmp_path / "prefixed.safetensors"))  # the VAE is a minority of the keys
    got, want = load_vae(tmp_path / "prefixed.safetensors").state_dict(), load_vae(path).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def _write(tmp_path, tensors, name="model.safetensors"):
    path = tmp_path / name
    save_file({k: torch.zeros(v) if isinstance(v, tuple) else v for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"transformer_blocks.0.img_mod.1.weight": (2, 2), "img_in.weight": (2, 2)}, "Qwen-Image diffusion model"),
        ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (2, 2)}, "Flux"),
        ({"encoder.down.0.block.0.conv1.weight": (2, 2), "decoder.conv_in.weight": (2, 4)}, "SD / SDXL"),
        ({"model.layers.0.self_attn.q_proj.weight": (2, 2)}, "text encoder"),
        ({"decoder.middle.0.residual.0.gamma": (2,), WAN22_MARKER: (2,)}, "Wan 2.2"),
        ({"something.else": (2,)}, "not a Qwen-Image VAE"),
    ],
)
def test_other_files_are_refused(tmp_path, tensors, message):
    path = _write(tmp_path, tensors)
    with pytest.raises(CheckpointError, match=message) as err:
        load_vae(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape", "dtype", "z_dim"])
def test_damaged_vae_is_refused(tmp_path, damage):
    sd = load_file(str(write_vae(tmp_path, "comfy", base_dim=8)))
    if damage == "missing":
        del sd["decoder.upsamples.7.resample.1.weight"]
        message = "missing 1 keys: decoder.up_blocks.1.upsamplers.0.resample.1.weight"
    elif damage == "unexpected":
        sd["decoder.extra.weight"] = torch.zeros(2)
        message = "unexpected 1 keys"
    elif damage == "shape":
        sd["decoder.head.2.weight"] = torch.zeros(3, 8, 3, 3)
        message = "wrong shapes: decoder.conv_out.weight"
    elif damage == "dtype":
        sd["conv1.bias"] = torch.zeros(32, dtype=torch.int32)
        message = "float32, float16 or bfloat16"
    else:
        sd["conv2.weight"] = torch.zeros(48, 48, 1, 1, 1)
        message = "48 latent channels"
    path = _write(tmp_path, sd, "broken.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_vae(path)
