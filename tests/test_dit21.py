"""The Qwen-Image-2.1 DiT against diffusers' QwenImage21Transformer2DModel (tiny random weights, float32, CPU):
text-to-image, references spliced into the prompt (block-causal attention), padded batches, and the prefix
K/V cache (cached steps equal uncached ones and diffusers' own extract / cached modes)."""

from __future__ import annotations

import pytest
import torch

from oracles import assert_close, diffusers_dit21, diffusers_velocity21
from qwen_image_core.qwen21 import DiT21
from tools.checkpoints import dit21 as W


@pytest.fixture(scope="module")
def tiny():
    cfg = W.tiny_config()
    sd = W.state_dict(cfg)
    ours = DiT21(cfg)
    ours.load_state_dict(sd, strict=True)
    return cfg, ours.eval(), diffusers_dit21(cfg, sd)


def condition(length, runs=(), b=1, seed=0, text_dim=40):
    """Random condition features [b, length, text_dim] and the image-slot mask with `runs` (start, count)."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.zeros(length, dtype=torch.bool)
    for start, n in runs:
        slots[start : start + n] = True
    return torch.randn(b, length, text_dim, generator=g), slots


def latents(*grids, b=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 64, h, w, generator=g) for h, w in grids]


@pytest.mark.parametrize("h,w", [(4, 6), (8, 4)])
def test_text_to_image_matches_diffusers(tiny, h, w):
    _, ours, ref = tiny
    txt, _ = condition(11)
    (img,) = latents((h, w))
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        assert_close(ours(img, sigma, txt), diffusers_velocity21(ref, img, sigma, txt))


@pytest.mark.parametrize(
    "grids,runs,length",
    [
        ([(4, 4)], [(3, 4)], 12),  # one reference inside the prompt
        ([(4, 6), (2, 8), (6, 2)], [(2, 6), (10, 4), (16, 3)], 22),  # three of different aspect
        ([(2, 4), (4, 2)], [(5, 4)], 12),  # two references adjacent: separate blocks, not one
    ],
    ids=["1-ref", "3-refs", "adjacent-refs"],
)
def test_references_match_diffusers(tiny, grids, runs, length):
    _, ours, ref = tiny
    txt, slots = condition(length, runs, seed=2)
    refs = latents(*grids, seed=3)
    (img,) = latents((4, 6), seed=4)
    sigma = torch.tensor([0.35])
    with torch.no_grad():
        expected = diffusers_velocity21(ref, img, sigma, txt, slots, refs)
        assert_close(ours(img, sigma, txt, slots, refs), expected)
        cache = ours.prefill(txt, slots, refs)
        assert_close(ours(img, sigma, cache=cache), expected)


def test_padded_batch_matches_diffusers_and_unpadded_rows(tiny):
    """Batch 2, prompts of 14 and 9 real tokens (right-padded): as diffusers with the mask, cached or not.
    (Padding keeps its RoPE positions, as in the reference, so a padded row is not its unpadded run.)"""
    _, ours, ref = tiny
    txt, slots = condition(14, [(3, 4)], b=2, seed=5)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[1, 9:] = False
    refs = latents((4, 4), seed=6)
    img = latents((4, 6), b=2, seed=7)[0]
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        v = ours(img, sigma, txt, slots, refs, txt_mask=mask)
        assert_close(v, diffusers_velocity21(ref, img, sigma, txt, slots, refs, mask))
        cache = ours.prefill(txt, slots, refs, mask)
        assert_close(ours(img, sigma, cache=cache), v)


def test_cache_reused_over_steps_equals_uncached_and_diffusers_cache(tiny):
    """One prefill, steps at other sigmas and latents: each equals the uncached forward, and
    diffusers' extract-then-cached run (within 1e-5 relative)."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    cfg, ours, ref = tiny
    txt, slots = condition(18, [(2, 6), (11, 2)], seed=8)
    refs = latents((4, 6), (2, 4), seed=9)
    kv = QwenImage21KVCache(cfg.num_layers)
    with torch.no_grad():
        cache = ours.prefill(txt, slots, refs)
        for step, s in enumerate((1.0, 0.3)):
            (img,) = latents((6, 4), seed=20 + step)
            sigma = torch.tensor([s])
            cached = ours(img, sigma, cache=cache)
            assert_close(cached, ours(img, sigma, txt, slots, refs))
            mode = "extract" if step == 0 else "cached"
            assert_close(cached, diffusers_velocity21(ref, img, sigma, txt, slots, refs, kv_cache=kv, kv_mode=mode))
    assert cache.prefix_len == 18 - 8 + 4 * 8 and cache.nbytes == 2 * cfg.num_layers * cache.prefix_len * 96 * 4


def test_condition_of_one_row_serves_a_batch(tiny):
    _, ours, _ = tiny
    txt, slots = condition(10, [(2, 4)], seed=10)
    refs = latents((4, 4), seed=11)
    img = latents((4, 4), b=3, seed=12)[0]
    sigma = torch.tensor([0.2, 0.5, 0.8])
    with torch.no_grad():
        v = ours(img, sigma, txt, slots, refs)
        for i in range(3):
            assert_close(v[i : i + 1], ours(img[i : i + 1], sigma[i : i + 1], txt, slots, refs))
        assert_close(ours(img, sigma, cache=ours.prefill(txt, slots, refs)), v)


def test_without_causal_condition_matches_diffusers():
    cfg = W.tiny_config(causal_condition=False, num_layers=1)
    sd = W.state_dict(cfg, seed=3)
    ours = DiT21(cfg)
    ours.load_state_dict(sd)
    ref = diffusers_dit21(cfg, sd)
    txt, slots = condition(10, [(2, 4)], seed=13)
    refs = latents((4, 4), seed=14)
    (img,) = latents((4, 4), seed=15)
    with torch.no_grad():
        sigma = torch.tensor([0.5])
        assert_close(ours(img, sigma, txt, slots, refs), diffusers_velocity21(ref, img, sigma, txt, slots, refs))
        with pytest.raises(ValueError, match="causal_condition"):
            ours.prefill(txt, slots, refs)


def test_bad_inputs_are_clear_errors(tiny):
    _, ours, _ = tiny
    txt, slots = condition(10, [(2, 4)])
    (img,) = latents((4, 4))
    refs = latents((4, 6))
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        with pytest.raises(ValueError, match="4 image slots but the 1 reference latents need 6"):
            ours(img, sigma, txt, slots, refs)
        with pytest.raises(ValueError, match="not both"):
            ours(img, sigma, txt, cache=ours.prefill(txt[:, :2]))
        with pytest.raises(ValueError, match="needs a condition"):
            ours(img, sigma)
        with pytest.raises(ValueError, match=r"expected \[B, 64, H, W\]"):
            ours(img[:, :16], sigma, txt[:, :2])
        with pytest.raises(ValueError, match="does not fill whole 2x2 image slots"):
            ours(img, sigma, txt, slots, latents((3, 3)))
        with pytest.raises(ValueError, match="11 references: Qwen-Image-2.1 takes at most 10"):
            ours(img, sigma, txt, slots, latents(*[(2, 2)] * 11))
