"""Qwen-Image-2.1 DiT files: Comfy-Org single files (fused gate_up, bf16 / fp32, prefixed or not), the diffusers
folder (split gate_layer / proj joined at load), int8_convrot (comfy_quant, kept packed: equal to comfy-kitchen's
dequantisation) and GGUF (kept packed: equal to gguf's dequantisation); each family's reader refuses the other's
files naming the right loader."""

from __future__ import annotations

import json

import pytest
import torch

from oracles import assert_close, diffusers_dit21, diffusers_velocity21
from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.mmdit import load_dit
from qwen_image_core.qwen21 import load_dit21
from tools.checkpoints import dit as W1
from tools.checkpoints import dit21 as W

CFG = W.tiny_config()


def check_forward(model, ref_sd, cfg=CFG):
    """model equals diffusers on `ref_sd` (ComfyUI names, float32) for an edit with one reference."""
    g = torch.Generator().manual_seed(0)
    txt = torch.randn(1, 12, cfg.text_dim, generator=g)
    slots = torch.zeros(12, dtype=torch.bool)
    slots[3:7] = True
    ref_img, img = torch.randn(1, 64, 4, 4, generator=g), torch.randn(1, 64, 4, 6, generator=g)
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        expected = diffusers_velocity21(diffusers_dit21(cfg, ref_sd), img, sigma, txt, slots, [ref_img])
        assert_close(model(img, sigma, txt, slots, [ref_img]), expected)


@pytest.mark.parametrize(
    "dtype,prefix", [(torch.float32, ""), (torch.bfloat16, W.PREFIX)], ids=["fp32", "bf16-prefixed"]
)
def test_comfy_single_file(tmp_path, dtype, prefix):
    path = W.write_comfy(tmp_path / "qwen_image_2.1.safetensors", CFG, dtype=dtype, prefix=prefix)
    model = load_dit21(path)
    assert model.config == CFG and model.storage == str(dtype).removeprefix("torch.")
    assert model.transformer_blocks[0].img_mlp.gate_up.weight.dtype == dtype
    check_forward(model, {k: v.to(dtype).float() for k, v in W.state_dict(CFG).items()})


@pytest.mark.parametrize("repo", [False, True], ids=["transformer-folder", "repo-folder"])
def test_diffusers_folder_joins_the_swiglu(tmp_path, repo):
    folder = W.write_diffusers(tmp_path / "qwen21", CFG, dtype=torch.float32, repo=repo)
    model = load_dit21(folder)
    assert model.config == CFG
    sd = W.state_dict(CFG)
    assert torch.equal(
        model.transformer_blocks[1].img_mlp.gate_up.weight, sd["transformer_blocks.1.img_mlp.gate_up.weight"]
    )
    check_forward(model, sd)


def test_real_sizes_follow_from_the_shapes():
    """The 7B model's sizes need no config: every DiT21Config field from the shapes alone."""
    from qwen_image_core.formats.dit21 import infer_config
    from qwen_image_core.qwen21 import DiT21Config

    shapes = W.shapes(DiT21Config())
    assert infer_config(shapes, {}, "real") == {k: getattr(DiT21Config(), k) for k in infer_config(shapes, {}, "real")}
    params = sum(torch.Size(s).numel() for s in shapes.values())
    assert 6.9e9 < params < 7.2e9, params


def test_int8_convrot_stays_packed_and_matches_kitchen(tmp_path):
    from tools.checkpoints import comfy_quant as CQ

    cfg = W.quant_config()
    path = W.write_comfy_quant(tmp_path / "qwen_image_2.1_int8_convrot.safetensors", cfg)
    model = load_dit21(path)
    layer = model.transformer_blocks[0].img_mlp.gate_up
    assert layer.weight.dtype == torch.int8 and layer.quant is not None
    assert "int8" in model.storage, model.storage
    check_forward(model, CQ.kitchen_weights(path, W.shapes(cfg)), cfg)


def test_gguf_stays_packed_and_matches_gguf(tmp_path):
    from tools.checkpoints import gguf as G

    cfg = W.quant_config()
    path = W.write_gguf(tmp_path / "qwen-image-2.1-Q8_0.gguf", cfg, "Q8_0")
    model = load_dit21(path)
    layer = model.transformer_blocks[1].attn.to_q
    assert layer.quant is not None and layer.weight.dtype == torch.uint8
    check_forward(model, G.dequantized(path), cfg)


def test_split_swiglu_files(tmp_path):
    """ComfyUI also loads the SwiGLU as diffusers' two layers (its detection sets `fused_mlp` False when
    `img_mlp.gate_up` is absent). Plain halves are joined (test_diffusers_folder_joins_the_swiglu); GGUF halves of
    one type are joined as stored and stay packed, bit-equal to the fused file; other quantised halves are named."""
    from safetensors.torch import load_file, save_file

    cfg = W.quant_config()
    fused = load_dit21(W.write_gguf(tmp_path / "fused.gguf", cfg, "Q8_0"))
    split = load_dit21(W.write_gguf(tmp_path / "split.gguf", cfg, "Q8_0", split_mlp=True))
    layer = split.transformer_blocks[1].img_mlp.gate_up
    assert layer.quant is not None and layer.weight.dtype == torch.uint8
    theirs = fused.state_dict()
    assert split.state_dict().keys() == theirs.keys()
    for k, v in split.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    sd = load_file(str(W.write_comfy_quant(tmp_path / "int8.safetensors", cfg)))
    base = "transformer_blocks.0.img_mlp."
    for suffix, half in (("gate_layer", 0), ("proj", 1)):
        for part in ("weight", "weight_scale"):
            sd[f"{base}{suffix}.{part}"] = sd[f"{base}gate_up.{part}"].chunk(2, dim=0)[half].clone()
        sd[f"{base}{suffix}.comfy_quant"] = sd[f"{base}gate_up.comfy_quant"].clone()
    for part in ("weight", "weight_scale", "comfy_quant"):
        del sd[f"{base}gate_up.{part}"]
    save_file(sd, str(tmp_path / "split_int8.safetensors"), metadata=W.config_metadata(cfg))
    with pytest.raises(CheckpointError, match=r"img_mlp\.(gate_layer|proj)\.weight is quantised in diffusers' split"):
        load_dit21(tmp_path / "split_int8.safetensors")


def test_each_reader_refuses_the_other_family(tmp_path):
    v21 = W.write_comfy(tmp_path / "qwen_image_2.1_bf16.safetensors", CFG)
    v1 = W1.write_comfy(tmp_path / "qwen_image_bf16.safetensors", W1.tiny_config())
    with pytest.raises(CheckpointError, match=r"Qwen-Image-2\.1 DiT.*load_dit21"):
        load_dit(v21)
    with pytest.raises(CheckpointError, match=r"Qwen-Image \(v1, 20B MMDiT\).*load_dit "):
        load_dit21(v1)
    folder21 = W.write_diffusers(tmp_path / "repo21", CFG, repo=True)
    with pytest.raises(CheckpointError, match="load_dit21"):
        load_dit(folder21)
    folder1 = W1.write_diffusers(tmp_path / "repo1", W1.tiny_config(), repo=True)
    with pytest.raises(CheckpointError, match="load_dit "):
        load_dit21(folder1)
    gguf21 = W.write_gguf(tmp_path / "q21.gguf", W.quant_config(), "Q8_0")
    with pytest.raises(CheckpointError, match="load_dit21"):
        load_dit(gguf21)


def test_bad_files_are_named(tmp_path):
    path = W.write_comfy(tmp_path / "f.safetensors", CFG)
    with pytest.raises(TypeError, match="unknown size"):
        load_dit21(path, layers=3)
    vae = W1.write_safetensors(
        tmp_path / "vae.safetensors", [("decoder.conv1.weight", (4, 4), torch.float32, lambda: torch.zeros(4, 4))]
    )
    with pytest.raises(CheckpointError, match="not a Qwen-Image-2.1 DiT file; it looks like a VAE"):
        load_dit21(vae)
    cfg = json.loads(W.config_metadata(CFG)["config"])["transformer"]
    cfg["_class_name"] = "FluxTransformer2DModel"
    bad = W1.write_safetensors(
        tmp_path / "bad.safetensors",
        [(k, s, torch.bfloat16, lambda s=s: torch.zeros(s)) for k, s in W.shapes(CFG).items()],
        {"config": json.dumps({"transformer": cfg})},
    )
    with pytest.raises(CheckpointError, match="not a Qwen-Image-2.1 DiT config"):
        load_dit21(bad)
    missing = W1.write_safetensors(
        tmp_path / "cut.safetensors",
        [
            (k, s, torch.bfloat16, lambda s=s: torch.zeros(s))
            for k, s in W.shapes(CFG).items()
            if "blocks.1.attn.to_k" not in k
        ],
        W.config_metadata(CFG),
    )
    with pytest.raises(CheckpointError, match=r"missing 1 keys: transformer_blocks\.1\.attn\.to_k\.weight"):
        load_dit21(missing)
