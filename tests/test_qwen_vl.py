"""Qwen2.5-VL language model and vision tower against transformers, and loading every file layout.

Oracle: transformers 5.23 `Qwen2_5_VLForConditionalGeneration` at a tiny config with seeded random
weights. transformers 5.x builds 3D M-RoPE positions only when `mm_token_type_ids` is passed (diffusers
0.42.1 does not pass it), so the oracle calls here pass it explicitly: the oracle then uses the 3D
positions of get_rope_index, which is the intended behaviour (transformers 4.x and ComfyUI do the same).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from oracles import image_row, noise_image, oracle_hidden, ours_hidden, pixels
from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.qwen_vl import QwenVL, QwenVLConfig
from qwen_image_core.text_encoder import load_text_encoder
from qwen_image_core.vision import window_order
from tools.checkpoints import qwen_vl as W

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread

ATOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    """The oracle; its weights are bf16-exact, so the bf16 files below hold exactly its numbers."""
    return W.reference_model(seed=0)


@pytest.fixture(scope="module")
def sd(ref):
    return W.legacy_state_dict(ref)


@pytest.fixture(scope="module")
def files(ref, sd, tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_vl")
    W.write_hf_folder(d / "hf_legacy" / "text_encoder", ref, naming="legacy")
    W.write_hf_folder(d / "hf_t5" / "text_encoder", ref, naming="transformers5", shards=2)
    W.write_comfy_single(d / "qwen_2.5_vl_7b.safetensors", sd)
    W.write_comfy_single(d / "full.safetensors", sd, prefix=W.FULL_PREFIX, lm_head=False)
    W.write_comfy_single(d / "no_vision.safetensors", sd, vision=False, lm_head=False)
    deq = W.write_comfy_fp8_scaled(d / "qwen_2.5_vl_7b_fp8_scaled.safetensors", sd)
    return d, deq


def load(path):
    return load_text_encoder(path, tokenizer=object()).model  # the tokenizer is not used here


def test_text_only_matches_transformers(ref, files):
    model = load(files[0] / "hf_legacy" / "text_encoder")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 152064, (2, 37), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0  # right padding of the second row
    expected = oracle_hidden(ref, ids, mask)
    got = ours_hidden(model, ids)
    assert (got[0] - expected[0]).abs().max() <= ATOL
    assert (got[1, :25] - expected[1, :25]).abs().max() <= ATOL


@pytest.mark.parametrize("sizes", [[(280, 196)], [(280, 196), (100, 150)]], ids=["one_image", "two_images"])
def test_images_match_transformers_with_3d_positions(ref, files, sizes):
    model = load(files[0] / "qwen_2.5_vl_7b.safetensors")
    pv, grids = pixels([noise_image(h, w, i) for i, (h, w) in enumerate(sizes)])
    counts = [int(g.prod()) // 4 for g in grids]
    ids = torch.tensor([image_row(11, counts, 6, torch.Generator().manual_seed(2))])
    expected = oracle_hidden(ref, ids, torch.ones_like(ids), pv, grids)
    got = ours_hidden(model, ids, pv, grids)
    assert (got - expected).abs().max() <= ATOL


def test_vision_features_in_raster_order(ref, files):
    """An image larger than one 4x4 window: window order differs from raster order, features still match."""
    model = load(files[0] / "hf_t5" / "text_encoder")
    pv, grids = pixels([noise_image(280, 364, 3)])  # 20 x 26 patches -> 10 x 13 merged tokens, 3 x 4 windows
    order, lengths = window_order([tuple(grids[0].tolist())], model.visual.cfg)
    assert not torch.equal(order, torch.arange(order.numel())) and len(lengths) == 12
    with torch.no_grad():
        expected = torch.cat(ref.model.get_image_features(pv, grids).pooler_output)
        got = model.encode_images(pv, [tuple(grids[0].tolist())])
    assert (got - expected).abs().max() <= ATOL


def test_all_layouts_load_the_same_weights(files, sd):
    d, _ = files
    baseline = load(d / "hf_legacy" / "text_encoder").state_dict()
    for name in ("hf_t5/text_encoder", "qwen_2.5_vl_7b.safetensors", "full.safetensors"):
        model = load(d / name)
        assert not any(k.startswith("lm_head") for k in model.state_dict())
        for k, v in baseline.items():
            assert torch.equal(model.state_dict()[k], v), (name, k)
    cfg = load(d / "full.safetensors").cfg
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vision.full_attention_blocks) == (2, 1, 128, (7,))


def test_fp8_scaled_stays_fp8_and_matches_dequantised_reference(ref, files):
    d, deq = files
    model = load(d / "qwen_2.5_vl_7b_fp8_scaled.safetensors")
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale is not None and q.weight_scale.ndim == 0
    assert model.visual.blocks[0].attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    oracle = copy.deepcopy(ref)
    oracle.load_state_dict(W.to_transformers5_names(deq), strict=True)
    pv, grids = pixels([noise_image(150, 220, 5)])
    ids = torch.tensor([image_row(9, [int(grids[0].prod()) // 4], 5, torch.Generator().manual_seed(4))])
    expected = oracle_hidden(oracle, ids, torch.ones_like(ids), pv, grids)
    assert (ours_hidden(model, ids, pv, grids) - expected).abs().max() <= ATOL


def test_weight_scale_spelling(tmp_path, sd):
    sd = {k: v for k, v in sd.items() if not k.startswith("lm_head")}
    deq = W.write_comfy_fp8_scaled(tmp_path / "te.safetensors", sd, spelling="weight_scale")
    model = load(tmp_path / "te.safetensors")
    w = model.model.layers[1].mlp.down_proj
    assert torch.equal(w.weight.float() * w.weight_scale, deq["model.layers.1.mlp.down_proj.weight"])


def test_without_vision_tower(files):
    te = load_text_encoder(files[0] / "no_vision.safetensors", tokenizer=object())
    assert te.model.visual is None and not te.has_vision
    with pytest.raises(ValueError, match="no vision tower"):
        te.encode("make it blue", images=[noise_image(64, 64, 0)], template="edit")


def test_other_families_and_broken_files_give_clear_errors(tmp_path, sd):
    sd = {k: v for k, v in sd.items() if not k.startswith("lm_head")}
    cases = {
        "dit.safetensors": (
            {"transformer_blocks.0.img_mod.1.weight": torch.zeros(2, 2), "txt_in.weight": torch.zeros(2)},
            "DiT",
        ),
        "flux.safetensors": ({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, "Flux"),
        "vae.safetensors": ({"decoder.conv_in.weight": torch.zeros(2, 2)}, "VAE"),
        "qwen3.safetensors": (
            {
                "model.layers.0.self_attn.q_norm.weight": torch.zeros(2),
                "model.layers.0.self_attn.k_proj.weight": torch.zeros(2, 2),
            },
            "Qwen3",
        ),
        "llama.safetensors": ({"model.layers.0.self_attn.k_proj.weight": torch.zeros(2, 2)}, "without q/k/v biases"),
        "qwen2vl.safetensors": (
            {
                "model.layers.0.self_attn.k_proj.bias": torch.zeros(2),
                "visual.blocks.0.mlp.fc1.weight": torch.zeros(2, 2),
            },
            "Qwen2-VL",
        ),
    }
    for name, (tensors, words) in cases.items():
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(CheckpointError, match=words):
            load(tmp_path / name)
    partial = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 keys: model.layers.1.mlp.up_proj.weight"):
        load(tmp_path / "partial.safetensors")
    no_merger = {k: v for k, v in sd.items() if not k.startswith("visual.merger.mlp.2")}
    save_file(no_merger, str(tmp_path / "no_merger.safetensors"))
    with pytest.raises(CheckpointError, match="incomplete"):
        load(tmp_path / "no_merger.safetensors")
    unscaled = {k: (v.to(torch.float8_e4m3fn) if k.endswith("q_proj.weight") else v) for k, v in sd.items()}
    unscaled["model.layers.0.mlp.up_proj.scale_weight"] = torch.tensor(1.0)
    save_file(unscaled, str(tmp_path / "unscaled.safetensors"))
    with pytest.raises(CheckpointError, match="has no scale"):
        load(tmp_path / "unscaled.safetensors")


def test_real_7b_config_names_shapes_and_parameter_count():
    """At the real size (meta device): our defaults, names and shapes equal transformers' 7B model's."""
    with torch.device("meta"):
        ours = QwenVL(QwenVLConfig())
        theirs = W.reference_model(
            text=dict(
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
            ),
            vision=dict(
                depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, fullatt_block_indexes=[7, 15, 23, 31]
            ),
            exact_in=None,
        )
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    expected = {k: tuple(v.shape) for k, v in W.legacy_state_dict(theirs).items() if not k.startswith("lm_head")}
    assert shapes == expected
    assert QwenVLConfig.from_shapes(shapes) == QwenVLConfig()
    count = lambda prefix: sum(p.numel() for k, p in ours.named_parameters() if k.startswith(prefix))  # noqa: E731
    assert (count("model."), count("visual.")) == (7_070_619_136, 676_550_144)  # as counted for the facts sheet
