"""Offloading the Qwen-Image-2.1 DiT with the shared planner and executor: streamed blocks give the resident
model's output bit for bit (prefill and cached steps, each a pass moving each streamed block once), and the
plans for the real 7B model on 8-24 GB cards count the prefix K/V cache."""

from __future__ import annotations

import pytest
import torch

from qwen_image_core import offload as O
from qwen_image_core import offload_plan as P
from qwen_image_core.costs import CARDS, GiB
from qwen_image_core.qwen21 import DiT21
from qwen_image_core.qwen21.plan import Workload21, plan_dit21, prefix_cache_bytes
from tools.checkpoints import dit21 as W


def test_streamed_blocks_equal_resident_bit_for_bit():
    cfg = W.tiny_config(num_layers=4)
    model = DiT21(cfg)
    model.load_state_dict(W.state_dict(cfg), strict=True)
    model.eval()
    g = torch.Generator().manual_seed(0)
    txt = torch.randn(1, 10, cfg.text_dim, generator=g)
    slots = torch.zeros(10, dtype=torch.bool)
    slots[2:6] = True
    refs = [torch.randn(1, 64, 4, 4, generator=g)]
    imgs = [torch.randn(1, 64, 4, 6, generator=g) for _ in range(2)]
    sigmas = [torch.tensor([0.9]), torch.tensor([0.3])]
    with torch.no_grad():
        cache = model.prefill(txt, slots, refs)
        expected = [model(x, s, cache=cache) for x, s in zip(imgs, sigmas, strict=True)]
        uncached = model(imgs[0], sigmas[0], txt, slots, refs)
    sizes, fixed = P.split_blocks(model, model.transformer_blocks)
    plan = P.plan_blocks(sizes, fixed, fixed + 3 * max(sizes), 0, 0, 1.0, 1e9, ring_sizes=(2,))
    assert len(plan.resident) == 1 and len(plan.streamed) == 3
    with O.BlockStreamer(model, model.transformer_blocks, plan, O.Transfer()) as s, torch.no_grad():
        streamed_cache = model.prefill(txt, slots, refs)
        for x, sigma, e in zip(imgs, sigmas, expected, strict=True):
            assert torch.equal(model(x, sigma, cache=streamed_cache), e)
        assert torch.equal(model(imgs[0], sigmas[0], txt, slots, refs), uncached)
        assert all(n == 4 for n in (s.stats.copies[i] for i in plan.streamed))  # prefill + 3 steps


@pytest.mark.parametrize("size", [1024, 2048])
def test_plans_for_8_to_24_gb_cards_count_the_cache(size):
    model = W.meta_model()  # the real 7B shapes, bf16
    wl = Workload21(width=size, height=size)
    resident = []
    for key in ("8GB", "12GB", "16GB", "24GB"):
        card = CARDS[key]
        plan = plan_dit21(model, card.vram - GiB, card, wl)
        sizes, fixed = P.split_blocks(model, model.transformer_blocks)
        assert plan.fixed_bytes == fixed + prefix_cache_bytes(model, wl)
        assert plan.device_bytes + plan.activation_bytes + plan.reserve <= plan.free
        resident.append(len(plan.resident))
    assert resident == sorted(resident) and resident[-1] == 32 and resident[0] < 32, resident


def test_a_cache_that_cannot_fit_is_named():
    model = W.meta_model()
    wl = Workload21(references=((2048, 2048),) * 3)  # 3 x 16384 reference tokens: a 27 GB cache
    with pytest.raises(P.PlanError, match="prefix K/V cache"):
        plan_dit21(model, 23 * GiB, CARDS["24GB"], wl)


def test_a_host_cache_lets_2048_with_a_reference_fit_12_gb():
    """On the device the plan then counts one block's keys and values, and their copy in each block's time."""
    model = W.meta_model()
    on_device = Workload21(references=((2048, 2048),))
    on_host = Workload21(references=((2048, 2048),), cache_on_host=True)
    with pytest.raises(P.PlanError, match="cache_on_host"):
        plan_dit21(model, 11 * GiB, CARDS["12GB"], on_device)
    plan = plan_dit21(model, 11 * GiB, CARDS["12GB"], on_host)
    _, fixed = P.split_blocks(model, model.transformer_blocks)
    assert plan.fixed_bytes == fixed + prefix_cache_bytes(model, on_host) // 32 and len(plan.resident) > 0
    assert plan.compute_s > plan_dit21(model, 23 * GiB, CARDS["24GB"], on_device).compute_s * 165.2 / 58.3


def test_a_cache_kept_on_another_device_is_copied_in_per_block():
    """cache_device: the keys and values are kept there and fetched per block (the same device here: CPU only)."""
    cfg = W.tiny_config(num_layers=2)
    model = DiT21(cfg)
    model.load_state_dict(W.state_dict(cfg))
    txt = torch.randn(1, 6, cfg.text_dim)
    img = torch.randn(1, 64, 4, 4)
    with torch.no_grad():
        cache = model.prefill(txt, cache_device="cpu")
        assert cache.device == "cpu" and all(k.device.type == "cpu" for k in cache.keys)
        assert torch.equal(model(img, torch.tensor([0.5]), cache=cache), model(img, torch.tensor([0.5]), txt))
