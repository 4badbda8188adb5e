"""Loaders that do not guess: sizes come from explicit overrides, the diffusers / transformers config.json (or a single
file's `config` metadata) and the shapes only where they are unambiguous; anything else is a clear CheckpointError.

Oracles: diffusers' QwenImageTransformer2DModel with non-default RoPE axes; transformers' Qwen2.5-VL with 64-channel
text and vision heads, other M-RoPE sections, RMSNorm epsilon and RoPE base than the 7B model.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from oracles import (
    assert_close,
    diffusers_dit,
    diffusers_velocity,
    image_row,
    inputs,
    noise_image,
    oracle_hidden,
    ours_hidden,
    pixels,
)
from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.formats import dit as dit_format
from qwen_image_core.formats import qwen_vl as vl_format
from qwen_image_core.mmdit import MMDiTConfig, config_from_shapes, load_dit
from qwen_image_core.qwen_vl import QwenVLConfig
from qwen_image_core.text_encoder import load_text_encoder
from tools.checkpoints import dit as W
from tools.checkpoints import qwen_vl as Q

pytestmark = pytest.mark.usefixtures("one_thread")

AXES = (8, 12, 12)  # not what the old head-width guess gave for 32-channel heads, (4, 14, 14)
DIT_CFG = W.tiny_config(rope_axes=AXES)


# -- DiT
@pytest.fixture(scope="module")
def dit_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dit_cfg")
    folder = W.write_diffusers(d / "transformer", DIT_CFG, dtype=torch.float32)
    bare = d / "bare.safetensors"  # the same weights in one file without any config
    W.write_safetensors(
        bare, [(k, s, torch.float32, lambda k=k, s=s: W.random_tensor(k, s, 0)) for k, s in W.shapes(DIT_CFG).items()]
    )
    return folder, bare, diffusers_dit(DIT_CFG, W.state_dict(DIT_CFG))


def velocities(model, ref):
    img, sigma, txt = inputs(h=10, w=12, seed=3)
    refs = [torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(4))]
    with torch.no_grad():
        return (model(img, sigma, txt), model(img, sigma, txt, ref_latents=refs)), (
            diffusers_velocity(ref, img, sigma, txt),
            diffusers_velocity(ref, img, sigma, txt, refs=refs),
        )


def test_dit_folder_with_other_rope_axes_matches_diffusers(dit_files):
    folder, _, ref = dit_files
    model = load_dit(folder)
    assert model.config.rope_axes == AXES
    for ours, theirs in zip(*velocities(model, ref), strict=True):
        assert_close(ours, theirs)


def test_dit_sizes_by_override_and_file_metadata(dit_files, tmp_path):
    folder, bare, ref = dit_files
    with pytest.raises(CheckpointError) as e:
        load_dit(bare)
    msg = str(e.value)
    assert str(bare) in msg and "cannot tell the RoPE axes of 32-channel heads" in msg and "axes_dims_rope" in msg
    told = load_dit(bare, rope_axes=AXES)
    for ours, theirs in zip(*velocities(told, ref), strict=True):
        assert_close(ours, theirs)
    meta = W.write_comfy(tmp_path / "with_meta.safetensors", DIT_CFG, dtype=torch.float32)  # carries `config`
    assert load_dit(meta).config == told.config
    overridden = load_dit(folder, rope_axes=(4, 14, 14))  # an override wins over config.json ...
    assert overridden.config.rope_axes == (4, 14, 14)
    ours, theirs = velocities(overridden, ref)
    assert (ours[0] - theirs[0]).abs().max() > 1e-3  # ... and the axes matter
    with pytest.raises(TypeError, match="unknown size rope"):
        load_dit(folder, rope=AXES)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"axes_dims_rope": "16,56,56"}, "axes_dims_rope is '16,56,56', expected three positive integers"),
        ({"axes_dims_rope": [8, 12]}, "axes_dims_rope is [8, 12]"),
        ({"axes_dims_rope": [8, 12, 12.0]}, "expected three positive integers"),
        ({"axes_dims_rope": [8, 8, 8]}, "inconsistent Qwen-Image DiT sizes (rope_axes (8, 8, 8) must be even and sum"),
        ({"num_layers": "2"}, "num_layers is '2', expected a positive integer"),
        ({"attention_head_dim": 0}, "attention_head_dim is 0"),
        ({"zero_cond_t": "yes"}, "zero_cond_t is 'yes', expected true or false"),
        ({"num_attention_heads": 4}, "wrong shapes"),  # a config that disagrees with the weights
    ],
)
def test_dit_config_json_values_are_checked(tmp_path, change, fragment):
    folder = W.write_diffusers(tmp_path / "t", DIT_CFG, shards=1)
    conf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**conf, **change}))
    with pytest.raises(CheckpointError) as e:
        load_dit(folder)
    assert fragment in str(e.value) and str(folder) in str(e.value)


def test_dit_config_json_that_is_not_json(tmp_path):
    folder = W.write_diffusers(tmp_path / "t", DIT_CFG, shards=1)
    for text, fragment in (("{oops", "not valid JSON"), ("[1, 2]", "must be a JSON object")):
        (folder / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=fragment):
            load_dit(folder)


def test_dit_sizes_from_shapes_only_where_unambiguous():
    assert config_from_shapes(W.shapes(MMDiTConfig())) == MMDiTConfig()  # the real 20B model needs no config
    assert config_from_shapes(W.shapes(MMDiTConfig(num_layers=2, patch_size=1, in_channels=16))).patch_size == 1
    shapes = W.shapes(DIT_CFG)
    with pytest.raises(CheckpointError, match="cannot tell the patch size from 48 input channels"):
        dit_format.infer_config({**shapes, "img_in.weight": (96, 48)}, {"rope_axes": AXES}, "f.safetensors")
    with pytest.raises(CheckpointError, match="width 96 does not split into heads of 40 channels"):
        config_from_shapes({**shapes, "transformer_blocks.0.attn.norm_q.weight": (40,)}, rope_axes=AXES)
    no_norm = {k: v for k, v in shapes.items() if "norm_q" not in k}
    with pytest.raises(CheckpointError, match="not a complete Qwen-Image DiT .no transformer_blocks.0.attn.norm_q"):
        config_from_shapes(no_norm, rope_axes=AXES)
    assert config_from_shapes(shapes, rope_axes=AXES) == DIT_CFG


# -- text encoder: 64-channel heads in both towers, other RoPE sections, epsilon and base
TEXT = dict(
    hidden_size=192,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=3,
    num_key_value_heads=1,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
)
VISION = dict(depth=4, hidden_size=128, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1, 3])
TEXT_SIZES = dict(num_heads=3, num_kv_heads=1, head_dim=64, mrope_section=(8, 12, 12), rms_eps=1e-5, rope_theta=1e4)


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    ref = Q.reference_model(seed=1, text=TEXT, vision=VISION)
    d = tmp_path_factory.mktemp("vl_cfg")
    folder = Q.write_hf_folder(d / "text_encoder", ref, shards=2)
    sd = {k: v for k, v in Q.legacy_state_dict(ref).items() if not k.startswith("lm_head")}
    single = Q.write_comfy_single(d / "other_size.safetensors", sd)
    return ref, folder, single, sd


def load(path, **kw):
    return load_text_encoder(path, tokenizer=object(), **kw).model


def assert_matches_transformers(model, ref):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 151000, (1, 23), generator=g)
    assert (ours_hidden(model, ids) - oracle_hidden(ref, ids, torch.ones_like(ids))).abs().max() <= 1e-5
    pv, grids = pixels([noise_image(112, 168, 6)])
    ids = torch.tensor([image_row(7, [int(grids[0].prod()) // 4], 4, g)])
    expected = oracle_hidden(ref, ids, torch.ones_like(ids), pv, grids)
    assert (ours_hidden(model, ids, pv, grids) - expected).abs().max() <= 1e-5


def test_text_encoder_folder_of_another_size_matches_transformers(vl):
    ref, folder, _, _ = vl
    model = load(folder)
    c = model.cfg
    assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.mrope_section) == (192, 3, 1, 64, (8, 12, 12))
    assert (c.rms_eps, c.rope_theta, c.vision.num_heads, c.vision.full_attention_blocks) == (1e-5, 1e4, 2, (1, 3))
    assert_matches_transformers(model, ref)


def test_text_encoder_single_file_needs_its_sizes(vl, tmp_path):
    ref, folder, single, sd = vl
    with pytest.raises(CheckpointError) as e:
        load(single)
    assert str(single) in str(e.value) and "cannot tell the query heads: 192 channels are not a multiple of 128" in (
        str(e.value)
    )
    with pytest.raises(CheckpointError, match="cannot tell the vision heads: 128 channels are not a multiple of 80"):
        load(single, **TEXT_SIZES)
    told = load(single, **TEXT_SIZES, vision={"num_heads": 2, "full_attention_blocks": (1, 3)})
    assert told.cfg == load(folder).cfg
    assert_matches_transformers(told, ref)
    conf = json.loads((folder / "config.json").read_text())
    save_file(sd, str(tmp_path / "meta.safetensors"), {"config": json.dumps({"text_encoder": conf})})
    assert load(tmp_path / "meta.safetensors").cfg == told.cfg
    with pytest.raises(TypeError, match="unknown size heads"):
        load(single, heads=3)


# the real Qwen/Qwen-Image text_encoder/config.json (transformers 4 layout), abridged to the fields that matter
REAL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "rope_theta": 1000000.0,
    "vocab_size": 152064,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}


def test_real_7b_config_and_shapes_agree():
    from qwen_image_core.qwen_vl import QwenVL

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in QwenVL(QwenVLConfig()).state_dict().items()}
    assert QwenVLConfig.from_shapes(shapes) == QwenVLConfig()  # no config needed at the real size
    assert QwenVLConfig.from_shapes(shapes, **vl_format.parse_config(REAL_7B, "config.json")) == QwenVLConfig()


def test_transformers_4_and_5_configs_read_the_same(vl):
    _, folder, _, _ = vl
    nested = vl_format.parse_config(json.loads((folder / "config.json").read_text()), "c")  # transformers 5
    flat = {**TEXT, "vocab_size": 152064, "rope_theta": 10000.0, "rope_scaling": {"mrope_section": [8, 12, 12]}}
    del flat["rope_parameters"]
    flat["vision_config"] = {**VISION, "in_chans": 3, "spatial_patch_size": 14, "out_hidden_size": 192}
    got = vl_format.parse_config({**flat, "model_type": "qwen2_5_vl"}, "c")
    assert {k: v for k, v in got.items() if k != "vision"} == {k: v for k, v in nested.items() if k != "vision"}
    assert all(nested["vision"][k] == v for k, v in got["vision"].items())


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"model_type": "qwen2_vl"}, "describes a 'qwen2_vl' model, not Qwen2.5-VL"),
        ({"hidden_size": "192"}, "hidden_size is '192', expected a positive integer"),
        ({"rms_norm_eps": -1}, "rms_eps is -1, expected a positive number"),
        ({"rope_scaling": {"mrope_section": [8, 12]}}, "mrope_section is [8, 12]"),
        ({"num_attention_heads": 5}, "hidden_size 192 does not split into the heads"),
        ({"vision_config": {"fullatt_block_indexes": "all"}}, "full_attention_blocks is 'all'"),
        ({"rope_parameters": {"mrope_section": [16, 24, 24]}}, "inconsistent Qwen2.5-VL text encoder sizes"),
        ({"intermediate_size": 100}, "wrong shapes"),  # a config that disagrees with the weights
    ],
)
def test_text_encoder_config_values_are_checked(vl, tmp_path, config, fragment):
    ref = vl[0]
    folder = Q.write_hf_folder(tmp_path / "text_encoder", ref, shards=1)
    conf = json.loads((folder / "config.json").read_text())
    conf["text_config"] = {**conf["text_config"], **config}
    if "vision_config" in config:
        conf["vision_config"] = {**conf["vision_config"], **config["vision_config"]}
    conf.update({k: v for k, v in config.items() if k == "model_type"})
    (folder / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError) as e:
        load(folder)
    assert fragment in str(e.value), str(e.value)


def test_text_encoder_shapes_that_fit_no_head_width_are_refused_not_divided_by_zero():
    """A 64-wide language model without a config used to fail with a bare ZeroDivisionError."""
    shapes = {
        "model.embed_tokens.weight": (100, 64),
        "model.layers.0.mlp.gate_proj.weight": (96, 64),
        "model.layers.0.self_attn.q_proj.weight": (64, 64),
        "model.layers.0.self_attn.k_proj.weight": (32, 64),
    }
    with pytest.raises(CheckpointError, match="cannot tell the query heads: 64 channels are not a multiple of 128"):
        QwenVLConfig.from_shapes(shapes, "te.safetensors")
    cfg = QwenVLConfig.from_shapes(shapes, "te.safetensors", num_heads=2, num_kv_heads=1, mrope_section=(4, 6, 6))
    assert (cfg.head_dim, cfg.num_heads, cfg.vision) == (32, 2, None)
    with pytest.raises(CheckpointError, match="M-RoPE sections of 32-channel heads"):
        QwenVLConfig.from_shapes(shapes, "te.safetensors", num_heads=2, num_kv_heads=1)
