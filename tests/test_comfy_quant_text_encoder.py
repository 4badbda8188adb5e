"""A Qwen2.5-VL text encoder with ComfyUI's quantised layers (the layout of Comfy-Org's int8_convrot encoders):
language-model linears int8 with ConvRot where their inputs split into groups of 256 (plain int8 otherwise),
vision linears int8 / fp8, the token embedding int8_convrot or fp8 (only the gathered rows dequantised). It
loads packed and gives transformers' Qwen2.5-VL run on comfy-kitchen's dequantised weights."""

from __future__ import annotations

import copy

import pytest
import torch

from oracles import image_row, noise_image, oracle_hidden, ours_hidden, pixels
from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.text_encoder import load_text_encoder
from tools.checkpoints import comfy_quant as C
from tools.checkpoints import qwen_vl as W

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ref():
    return W.reference_model(seed=0)


def choose(name, t):
    if C.te_linears(name, t):
        return "int8_convrot"
    if name.startswith("visual.blocks.") and t.ndim == 2:
        return "int8_tensorwise"
    return "float8_e4m3fn" if name.startswith("visual.merger.") and t.ndim == 2 else None


@pytest.mark.parametrize("embedding", ["int8_convrot", "float8_e4m3fn"])
def test_quantised_text_encoder_matches_transformers_on_kitchen_weights(tmp_path, ref, embedding):
    sd = W.legacy_state_dict(ref)
    path = C.write_text_encoder(tmp_path / "qwen_2.5_vl_7b_int8_convrot.safetensors", sd, choose, embedding)
    encoder = load_text_encoder(path, tokenizer=object())
    model = encoder.model
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.dtype == torch.int8 and layer.self_attn.q_proj.quant.convrot == 256
    assert layer.mlp.down_proj.quant.convrot == 0  # 64 inputs: int8 without rotation, `convrot: false`
    assert model.visual.blocks[0].attn.qkv.weight.dtype == torch.int8
    assert model.visual.merger.mlp[0].weight.dtype == torch.float8_e4m3fn
    table = model.model.embed_tokens
    assert table.weight.dtype == (torch.int8 if embedding.startswith("int8") else torch.float8_e4m3fn)
    assert "int8_convrot (int8 + per-row scales)" in model.storage
    oracle = copy.deepcopy(ref)
    weights = C.kitchen_weights(path)
    weights["lm_head.weight"] = sd["lm_head.weight"]
    oracle.load_state_dict(W.to_transformers5_names(weights), strict=True)
    pv, grids = pixels([noise_image(150, 220, 5)])
    ids = torch.tensor([image_row(9, [int(grids[0].prod()) // 4], 5, torch.Generator().manual_seed(4))])
    expected = oracle_hidden(oracle, ids, torch.ones_like(ids), pv, grids)
    assert (ours_hidden(model, ids, pv, grids) - expected).abs().max() <= 1e-5
    rows = torch.tensor([[3, 151000, 7]])
    got, want = table(rows, torch.float32), weights["model.embed_tokens.weight"][rows]
    if embedding == "float8_e4m3fn":
        assert torch.equal(got, want)
    else:  # the ConvRot un-rotation of 3 rows is a 3-row matmul: BLAS may round it unlike the whole table's
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()  # float32 rounding (measured 5.9e-7 here)
        full = table.quant.dequantize(table.weight, {n: getattr(table, n) for n in table.quant.extras}, torch.float32)
        assert torch.equal(full, weights["model.embed_tokens.weight"])  # the whole table: kitchen's bits


def test_an_unknown_format_in_a_text_encoder_names_itself(tmp_path, ref):
    sd = {k: v for k, v in W.legacy_state_dict(ref).items() if not k.startswith(("visual.", "lm_head."))}
    path = C.write_text_encoder(tmp_path / "te.safetensors", sd, lambda name, t: None, embedding=None)
    from safetensors.torch import load_file, save_file

    stored = load_file(str(path))
    stored["model.layers.1.mlp.up_proj.comfy_quant"] = C.marker({"format": "fp6_e3m2"})
    save_file(stored, str(path))
    with pytest.raises(CheckpointError, match=r"layer model\.layers\.1\.mlp\.up_proj .*'fp6_e3m2'"):
        load_text_encoder(path, tokenizer=object())
