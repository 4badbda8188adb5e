"""The MMDiT against diffusers' QwenImageTransformer2DModel (random tiny weights) and ComfyUI 0.3.75's own model
(one full-width block), on CPU in float32; plus the float16 path and MS-RoPE position ids."""

from __future__ import annotations

import gc
import math

import pytest
import torch

from oracles import assert_close, diffusers_dit, diffusers_velocity, inputs
from qwen_image_core import rope
from qwen_image_core.mmdit import load_dit
from tools.checkpoints import dit as W


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny ComfyUI-layout float32 file, our model loaded from it and diffusers' model with the same weights."""
    cfg = W.tiny_config()
    path = W.write_comfy(tmp_path_factory.mktemp("dit") / "tiny.safetensors", cfg, dtype=torch.float32)
    return cfg, load_dit(path), diffusers_dit(cfg, W.state_dict(cfg))


@pytest.mark.parametrize("h,w", [(8, 12), (10, 14), (14, 6)], ids=["even", "odd-5x7", "odd-7x3"])
def test_text_to_image_matches_diffusers(tiny, h, w):
    _, ours, ref = tiny
    img, sigma, txt = inputs(h=h, w=w)
    with torch.no_grad():
        assert_close(ours(img, sigma, txt), diffusers_velocity(ref, img, sigma, txt))


def test_masked_batch_of_different_text_lengths(tiny):
    """Batch 2 with text of 7 and 4 tokens: equal to diffusers with the same mask and to two unpadded runs."""
    _, ours, ref = tiny
    img, sigma, txt = inputs(b=2, L=7)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    with torch.no_grad():
        v = ours(img, sigma, txt, txt_mask=mask)
        assert_close(v, diffusers_velocity(ref, img, sigma, txt, mask))
        assert_close(v[1:], ours(img[1:], sigma[1:], txt[1:, :4]))
        assert_close(v[:1], ours(img[:1], sigma[:1], txt[:1]))


@pytest.mark.parametrize(
    "ref_sizes",
    [[(8, 8)], [(6, 10), (12, 16)], [(4, 4), (10, 6), (16, 18)]],
    ids=["1-ref", "2-refs", "3-refs-larger-than-target"],
)
def test_edit_references_match_diffusers(tiny, ref_sizes):
    _, ours, ref = tiny
    img, sigma, txt = inputs(h=10, w=12, seed=1)
    g = torch.Generator().manual_seed(2)
    refs = [torch.randn(1, 16, h, w, generator=g) for h, w in ref_sizes]
    with torch.no_grad():
        assert_close(ours(img, sigma, txt, ref_latents=refs), diffusers_velocity(ref, img, sigma, txt, refs=refs))


def test_zero_cond_t_from_config_json_and_marker(tmp_path):
    cfg = W.tiny_config()
    sd = W.state_dict(cfg)
    ref = diffusers_dit(cfg, sd, zero_cond_t=True)
    folder = W.write_diffusers(tmp_path / "repo", cfg, dtype=torch.float32, zero_cond_t=True, repo=True)
    marked = W.write_comfy(
        tmp_path / "edit_2511.safetensors", cfg, dtype=torch.float32, prefix=W.PREFIX, zero_cond_t=True
    )
    plain = W.write_comfy(tmp_path / "edit_2509.safetensors", cfg, dtype=torch.float32)
    img, sigma, txt = inputs(b=2, h=8, w=8, seed=3)
    refs = [torch.randn(2, 16, 6, 10), torch.randn(2, 16, 8, 8)]
    expected = diffusers_velocity(ref, img, sigma, txt, refs=refs)
    with torch.no_grad():
        for path in (folder, marked):
            m = load_dit(path)
            assert m.zero_cond_t
            assert_close(m(img, sigma, txt, ref_latents=refs), expected)
        m = load_dit(plain)
        assert not m.zero_cond_t
        assert_close(m(img, sigma, txt, ref_latents=refs, zero_cond_t=True), expected)
        assert (m(img, sigma, txt, ref_latents=refs) - expected).abs().max() > 1e-3  # the switch matters


def test_odd_latent_size_is_padded_circularly_and_cropped(tiny):
    _, ours, _ = tiny
    img, sigma, txt = inputs(h=9, w=7)
    with torch.no_grad():
        v = ours(img, sigma, txt)
        padded = torch.nn.functional.pad(img, (0, 1, 0, 1), mode="circular")
        assert v.shape == img.shape
        assert torch.equal(v, ours(padded, sigma, txt)[:, :, :9, :7])


def test_float16_keeps_streams_finite(tiny, tmp_path):
    """Gates of 400 and loud MLPs push the residual streams past the float16 range; float16 must stay finite."""
    cfg = W.tiny_config()
    sd = W.state_dict(cfg)
    d = cfg.hidden
    for i in range(cfg.num_layers):
        for mod in ("img_mod", "txt_mod"):
            bias = sd[f"transformer_blocks.{i}.{mod}.1.bias"]
            bias[2 * d : 3 * d] += 400.0  # gate1
            bias[5 * d : 6 * d] += 400.0  # gate2
        for mlp in ("img_mlp", "txt_mlp"):
            sd[f"transformer_blocks.{i}.{mlp}.net.2.weight"] *= 300.0  # MLP outputs in the hundreds
    path = tmp_path / "loud.safetensors"
    entries = [(k, tuple(v.shape), torch.float32, lambda v=v: v) for k, v in sd.items()]
    W.write_safetensors(path, entries, W.config_metadata(cfg))
    m = load_dit(path)
    img, sigma, txt = inputs()
    peak = []
    hook = m.transformer_blocks[0].register_forward_hook(
        lambda mod, i, o: peak.append(max(o[0].abs().max().item(), o[1].abs().max().item()))
    )
    with torch.no_grad():
        v32 = m(img, sigma, txt)
        hook.remove()
        assert peak[0] > 65504, "the test must overflow float16 in the residual stream"
        v16 = m(img.half(), sigma, txt.half())
    assert v16.dtype == torch.float16 and torch.isfinite(v16).all()
    assert (v16.float() - v32).abs().max() <= 2e-2 * v32.abs().max()


def test_rope_positions_follow_diffusers():
    assert rope.centred(5).tolist() == [-3, -2, -1, 0, 1]  # ComfyUI 0.3.75 would give -2..2
    assert rope.centred(4).tolist() == [-2, -1, 0, 1]
    assert rope.text_start([(5, 5), (5, 7)]) == 3  # references count (ComfyUI 0.3.75: target only -> 2)
    pos = rope.joint_positions([(2, 3), (1, 2)], text_len=2)
    assert pos[:2].tolist() == [[1, 1, 1], [2, 2, 2]]
    assert pos[2:8, 0].tolist() == [0] * 6 and pos[8:, 0].tolist() == [1, 1]
    assert pos[2:8, 1:].tolist() == [[-1, -2], [-1, -1], [-1, 0], [0, -2], [0, -1], [0, 0]]


def test_config_defaults_are_the_20b_model():
    from qwen_image_core.mmdit import MMDiT, MMDiTConfig  # noqa: PLC0415

    cfg = MMDiTConfig()
    assert (cfg.num_layers, cfg.hidden, cfg.mlp_dim, cfg.text_dim, cfg.rope_axes) == (
        60,
        3072,
        12288,
        3584,
        (16, 56, 56),
    )
    with torch.device("meta"):
        m = MMDiT(cfg)
    sd = m.state_dict()
    assert len(sd) == 1933 and sum(t.numel() for t in sd.values()) == 20_430_401_088


# ---------------------------------------------------------------------------------------------------------
# ComfyUI 0.3.75 parity: one full-width block (ComfyUI fixes the widths), bf16 ComfyUI-format file
# ---------------------------------------------------------------------------------------------------------


def comfy_model(path):
    from tools.comfy_paths import import_comfy_for_oracle  # noqa: PLC0415

    import_comfy_for_oracle()
    import comfy.ops  # noqa: PLC0415
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    with torch.device("meta"):
        m = QwenImageTransformer2DModel(num_layers=1, operations=comfy.ops.disable_weight_init)
    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    m.load_state_dict(sd, strict=True, assign=True)
    return m.eval()


def test_full_width_block_matches_comfyui(tmp_path):
    path = W.write_comfy(tmp_path / "qwen_image_1block_bf16.safetensors", W.config(**W.FULL_WIDTH_ONE_BLOCK))
    g = torch.Generator().manual_seed(5)
    img, ref_img = torch.randn(1, 16, 16, 20, generator=g), torch.randn(1, 16, 12, 16, generator=g)
    txt, sigma = torch.randn(1, 12, 3584, generator=g), torch.tensor([0.62])
    ours = load_dit(path)
    with torch.no_grad():
        v_t2i = ours(img, sigma, txt)
        v_edit = ours(img, sigma, txt, ref_latents=[ref_img])
    del ours
    gc.collect()
    comfy = comfy_model(path)
    with torch.no_grad():
        c_t2i = comfy(img[:, :, None], sigma, txt)[:, :, 0]
        c_edit = comfy(img[:, :, None], sigma, txt, ref_latents=[ref_img[:, :, None]])[:, :, 0]
    del comfy
    gc.collect()
    assert math.isfinite(v_t2i.abs().max().item())
    assert_close(v_t2i, c_t2i)
    assert_close(v_edit, c_edit)
