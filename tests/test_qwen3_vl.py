"""Qwen3-VL (Qwen-Image-2.1's condition encoder) against transformers and diffusers, and its file layouts.

Oracles: transformers 5.23 `Qwen3VLForConditionalGeneration` at a tiny config with seeded random weights
(`tools/checkpoints/qwen3_vl.py`); for whole prompts, diffusers 0.42.1's own `get_qwenimage21_prompt_embeds`
(the modular qwenimage21 text-encoder step) driving that model through transformers' `Qwen3VLProcessor`.
The features are the last decoder layer's output before the final norm (the reference hooks the norm out).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Qwen2Tokenizer

from oracles import TOKENIZER, noise_image, qwen3_features, qwen3_image_processor, qwen3_processor, rel_close
from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.prompts import IMAGE_PAD, VISION_END, VISION_START, rope_index
from qwen_image_core.qwen21 import prompts as P
from qwen_image_core.qwen21.encoder import load_qwen3_vl
from qwen_image_core.qwen21.qwen3_vl import Qwen3VL, Qwen3VLConfig
from qwen_image_core.text_encoder import load_text_encoder
from tools.checkpoints import qwen3_vl as W

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread

TOL = 1e-5  # max |ours - reference| relative to max |reference|


def close(ours, ref):
    return rel_close(ours, ref, TOL)


def safe_metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def ref():
    return W.reference_model(seed=0)


@pytest.fixture(scope="module")
def tok():
    return Qwen2Tokenizer.from_pretrained(str(TOKENIZER))


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3_vl")
    W.write_hf_folder(d / "hf" / "text_encoder", ref, naming="transformers5", shards=2)
    W.write_single(d / "qwen3vl_8b_bf16.safetensors", ref)
    W.write_single(d / "text_only.safetensors", ref, vision=False)
    return d


@pytest.fixture(scope="module")
def encoder(files, tok):
    return load_qwen3_vl(files / "qwen3vl_8b_bf16.safetensors", tokenizer=tok)


def test_text_features_match_transformers(ref, encoder):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 151643, (1, 41), generator=g)
    expected = qwen3_features(ref, input_ids=ids, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        got = encoder.model(ids, rope_index(ids, []), torch.float32)
    close(got, expected)


def test_vision_features_and_deepstack_match_transformers_two_aspects(ref, encoder):
    images = [noise_image(160, 224, 0), noise_image(96, 64, 1)]  # landscape and portrait, grids 10x14 and 6x4
    out = qwen3_image_processor()(images, return_tensors="pt")
    pv, grids = out["pixel_values"], out["image_grid_thw"]
    ours = [P.vision_patches21(im) for im in images]
    assert [g for _, g in ours] == [tuple(g) for g in grids.tolist()]
    assert torch.equal(torch.cat([p for p, _ in ours]), pv)  # our preprocessing = the processor's, bit for bit
    with torch.no_grad():
        theirs = ref.model.get_image_features(pv, grids)
        merged, deepstack = encoder.model.encode_images(pv, [tuple(g) for g in grids.tolist()])
    close(merged, torch.cat(theirs.pooler_output))
    assert len(deepstack) == 2
    for a, b in zip(deepstack, theirs.deepstack_features, strict=True):
        close(a, torch.cat(b))
    # the whole encoder with both images in one prompt (DeepStack added after layers 0 and 1, 3D positions)
    g = torch.Generator().manual_seed(2)
    row = torch.randint(0, 151000, (7,), generator=g).tolist()
    for grid in grids:
        row += [VISION_START] + [IMAGE_PAD] * (int(grid.prod()) // 4) + [VISION_END] + [1, 2, 3]
    ids = torch.tensor([row])
    expected = qwen3_features(
        ref, input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_grid_thw=grids,
        mm_token_type_ids=(ids == IMAGE_PAD).int(),
    )  # fmt: skip
    with torch.no_grad():
        got = encoder.model(ids, rope_index(ids, [tuple(g) for g in grids.tolist()]), torch.float32,
                            (merged, deepstack), ids == IMAGE_PAD)  # fmt: skip
    close(got, expected)


def diffusers_embeds(ref, tok, prompts, images=None):
    from diffusers.modular_pipelines.qwenimage21.encoders import get_qwenimage21_prompt_embeds

    return get_qwenimage21_prompt_embeds(ref, qwen3_processor(tok), prompts, image=images, device="cpu")


def test_t2i_prompts_match_diffusers(ref, tok, encoder):
    prompts = ["a red fox in the snow, watercolour", "", P.rgba_prompt("a glass bottle")]
    e, m, s = diffusers_embeds(ref, tok, prompts)
    got, mask, slots = encoder.encode(prompts)
    assert torch.equal(mask, m.bool()) and not slots.any() and not s.any()
    close(got[mask], e[m.bool()])
    assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))


def test_edit_with_references_of_two_aspects_and_alpha_matches_diffusers(ref, tok, encoder):
    rgba = np.random.RandomState(3).randint(0, 256, (64, 96, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(96)[None] < 40, 0, 200)  # transparent left part, translucent right part
    images = [P.official_resize(noise_image(150, 100, 4), 128), P.official_resize(Image.fromarray(rgba, "RGBA"), 96)]
    assert [im.size for im in images] == [(96, 160), (128, 64)] and images[1].mode == "RGBA"
    prompts = ["put <image1> on <image2>", "make <image2> blue"]
    e, m, s = diffusers_embeds(ref, tok, prompts, images)
    got, mask, slots = encoder.encode(prompts, images)
    assert torch.equal(mask, m.bool()) and torch.equal(slots, s.bool()) and slots.any()
    close(got[mask], e[m.bool()])


def test_all_layouts_load_the_same_weights(files, tok, encoder):
    baseline = encoder.model.state_dict()
    hf = load_qwen3_vl(files / "hf" / "text_encoder", tokenizer=tok).model
    assert hf.cfg == encoder.model.cfg
    for k, v in baseline.items():
        assert torch.equal(hf.state_dict()[k], v), k
    text_only = load_qwen3_vl(files / "text_only.safetensors", tokenizer=tok)
    assert text_only.model.visual is None
    with pytest.raises(ValueError, match="no vision tower"):
        text_only.encode("x", [noise_image(64, 64, 0)])


def test_comfy_org_layout_loads_the_same_weights(files, ref, tok, encoder, tmp_path):
    """Comfy-Org's `qwen3vl_8b_bf16` names (language model `model.*`, vision `model.visual.*`, a top-level
    `lm_head`), and ComfyUI's own module names (`visual.*`, `model.lm_head`, as a ComfyUI save holds them), load
    bit-equal to the canonical file, the head dropped."""
    path = W.write_single(tmp_path / "qwen3vl_8b_bf16.safetensors", ref, layout="comfy")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "model.visual.deepstack_merger_list.0.norm.weight" in keys and "lm_head.weight" in keys
    assert not any(k.startswith("visual.") for k in keys)
    baseline = encoder.model.state_dict()
    comfy = load_qwen3_vl(path, tokenizer=tok).model
    assert comfy.cfg == encoder.model.cfg and comfy.state_dict().keys() == baseline.keys()
    for k, v in comfy.state_dict().items():
        assert torch.equal(v, baseline[k]), k
    sd = load_file(str(files / "qwen3vl_8b_bf16.safetensors"))
    sd["model.lm_head.weight"] = torch.zeros(8, 4)  # any shape: never read
    save_file(
        sd, str(tmp_path / "comfyui_saved.safetensors"), metadata=safe_metadata(files / "qwen3vl_8b_bf16.safetensors")
    )
    assert load_qwen3_vl(tmp_path / "comfyui_saved.safetensors", tokenizer=tok).model.cfg == encoder.model.cfg


def test_each_family_refuses_the_other(files, tmp_path, tok):
    v1 = {  # the keys that tell a Qwen2.5-VL file (q/k/v biases, no q/k norms), tiny
        "model.embed_tokens.weight": torch.zeros(8, 4),
        "model.layers.0.self_attn.k_proj.bias": torch.zeros(4),
        "model.layers.0.self_attn.k_proj.weight": torch.zeros(4, 4),
        "visual.blocks.0.mlp.gate_proj.weight": torch.zeros(4, 4),
    }
    save_file(v1, str(tmp_path / "qwen_2.5_vl_7b.safetensors"))
    with pytest.raises(CheckpointError, match="Qwen2.5-VL text encoder of Qwen-Image v1"):
        load_qwen3_vl(tmp_path / "qwen_2.5_vl_7b.safetensors", tokenizer=tok)
    for name in ("qwen3vl_8b_bf16.safetensors", "text_only.safetensors"):
        with pytest.raises(CheckpointError, match="Qwen-Image-2.1"):
            load_text_encoder(files / name, tokenizer=tok)


def test_real_8b_config_names_and_shapes():
    """At the real size (meta device): our defaults, names and shapes equal transformers' Qwen3-VL-8B."""
    with torch.device("meta"):
        ours = Qwen3VL(Qwen3VLConfig())
        theirs = W.reference_model(
            text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                      num_key_value_heads=8),
            vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                        num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
            exact_in=None,
        )  # fmt: skip
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    expected = {k: tuple(v.shape) for k, v in W.legacy_state_dict(theirs).items() if not k.startswith("lm_head")}
    assert shapes == expected
    from qwen_image_core.formats import qwen3_vl as F
    from qwen_image_core.qwen21.vision3 import Vision3Config

    fields = F.config_fields(shapes, {}, "the 8B shapes")
    vision = fields.pop("vision")
    assert Qwen3VLConfig(**fields, vision=Vision3Config(**vision)) == Qwen3VLConfig()


def test_tokenizer_found_in_the_repo_processor_folder(files, tmp_path):
    import shutil

    repo = tmp_path / "Qwen-Image-2.1"
    shutil.copytree(files / "hf" / "text_encoder", repo / "text_encoder")
    shutil.copytree(TOKENIZER, repo / "processor")
    enc = load_qwen3_vl(repo / "text_encoder")
    assert enc.drop() == len(enc.tokenizer(P.SYSTEM_BLOCK)["input_ids"]) > 5
