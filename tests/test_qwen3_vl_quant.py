"""Qwen3-VL files with ComfyUI's quantised layers, the layouts of Comfy-Org's `qwen3vl_8b_int8_convrot` and
`qwen3vl_8b_w4a8` (language-model linears int8 + ConvRot / asym_w4a8_int8, the rest bf16; the tiny model's
64-input down projections cannot take ConvRot: plain int8 there, bf16 for w4a8). They load packed (through the
shared comfy_quant reader) and give transformers' Qwen3-VL run on comfy-kitchen's dequantised weights."""

from __future__ import annotations

import copy

import pytest
import torch

from oracles import noise_image, qwen3_features, rel_close
from qwen_image_core.prompts import IMAGE_PAD, VISION_END, VISION_START, rope_index
from qwen_image_core.qwen21 import prompts as P
from qwen_image_core.qwen21.encoder import load_qwen3_vl
from tools.checkpoints import comfy_quant as C
from tools.checkpoints import qwen3_vl as W
from tools.checkpoints.qwen_vl import to_transformers5_names

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ref():
    return W.reference_model(seed=0)


@pytest.mark.parametrize("fmt", ["int8_convrot", "asym_w4a8_int8"])
def test_quantised_encoder_matches_transformers_on_kitchen_weights(tmp_path, ref, fmt):
    path = W.write_quantised(tmp_path / f"qwen3vl_8b_{fmt}.safetensors", ref, fmt)
    model = load_qwen3_vl(path, tokenizer=object()).model
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.int8 and q.quant is not None and fmt in model.storage
    sd = W.legacy_state_dict(ref)
    weights = C.kitchen_weights(path, {k: tuple(v.shape) for k, v in sd.items()})
    oracle = copy.deepcopy(ref)
    weights["lm_head.weight"] = sd["lm_head.weight"]
    oracle.load_state_dict(to_transformers5_names(weights), strict=True)
    patches, grid = P.vision_patches21(noise_image(96, 128, 7))
    ids = torch.tensor([[11, 12, 13, VISION_START] + [IMAGE_PAD] * (grid[1] * grid[2] // 4) + [VISION_END, 14, 15]])
    grids = torch.tensor([grid])
    expected = qwen3_features(
        oracle, input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=patches, image_grid_thw=grids,
        mm_token_type_ids=(ids == IMAGE_PAD).int(),
    )  # fmt: skip
    with torch.no_grad():
        feats = model.encode_images(patches, [grid])
        got = model(ids, rope_index(ids, [grid]), torch.float32, feats, ids == IMAGE_PAD)
    rel_close(got, expected, 1e-5)


@pytest.mark.parametrize("fmt", ["int8_convrot", "asym_w4a8_int8"])
def test_comfy_org_layout_loads_the_same_packed_layers(tmp_path, ref, fmt):
    """Comfy-Org's names (`model.visual.*`, a quantised top-level `lm_head` with its marker and scales, dropped)
    give the canonical-named file's layers, packed tensors bit for bit."""
    ours = load_qwen3_vl(W.write_quantised(tmp_path / "canonical.safetensors", ref, fmt), tokenizer=object()).model
    path = W.write_quantised(tmp_path / f"qwen3vl_8b_{fmt}.safetensors", ref, fmt, layout="comfy")
    comfy = load_qwen3_vl(path, tokenizer=object()).model
    assert comfy.cfg == ours.cfg and comfy.storage == ours.storage
    baseline = ours.state_dict()
    assert comfy.state_dict().keys() == baseline.keys()
    for k, v in comfy.state_dict().items():
        assert torch.equal(v, baseline[k]), k
    theirs = dict(ours.named_modules())
    packed = [(n, m) for n, m in comfy.named_modules() if getattr(m, "quant", None) is not None]
    assert packed
    for name, m in packed:  # scales and codebooks too: the dequantised weights are equal
        assert torch.equal(m.compute_weight(torch.float32), theirs[name].compute_weight(torch.float32)), name
