"""Qwen3-VL (Qwen-Image-2.1's encoder) through the shared planner and executor, as v1's text encoder.

The planner (`offload_plan.plan_text_encoder`) streams the encoder's decoder layers (`model.model.layers`) and
keeps the rest (embeddings, vision tower, norm) resident; the executor (`offload.BlockStreamer`) copies the
streamed layers into staging buffers. On CPU with a fake budget the streamed run must equal the resident one bit
for bit, DeepStack injections (added between the first layers) included.
"""

from __future__ import annotations

import pytest
import torch

from qwen_image_core import offload as O
from qwen_image_core import offload_plan as P
from qwen_image_core.costs import CARDS, GiB
from qwen_image_core.prompts import IMAGE_PAD, rope_index
from qwen_image_core.qwen21.qwen3_vl import Qwen3VL, Qwen3VLConfig
from qwen_image_core.qwen21.vision3 import Vision3Config

pytestmark = pytest.mark.usefixtures("one_thread")

FREE_LOSS, RESERVE = 600 << 20, GiB  # as test_offload_plan: free = total - 0.6 GiB, 1 GiB reserve


def tiny(seed: int = 0) -> Qwen3VL:
    vision = Vision3Config(depth=3, hidden_size=32, num_heads=2, intermediate_size=40, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_layers=(0, 1))  # fmt: skip
    cfg = Qwen3VLConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_layers=5, num_heads=4,
                        num_kv_heads=2, head_dim=16, mrope_section=(4, 2, 2), vision=vision)  # fmt: skip
    torch.manual_seed(seed)
    te = Qwen3VL(cfg)
    for t in te.parameters():
        t.data.normal_(0, 0.3)
    return te.requires_grad_(False).eval()


def test_streamed_layers_equal_resident_with_deepstack():
    te = tiny()
    grids = [(1, 4, 6)]
    patches = torch.randn(24, te.cfg.vision.patch_dim, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[5, 7, 9] + [IMAGE_PAD % 60] * 6 + [3, 4]])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 3:9] = True
    pos = rope_index(torch.where(mask, IMAGE_PAD, ids), grids)
    with torch.inference_mode():
        feats = te.encode_images(patches, grids)
        reference = te(ids, pos, torch.float32, feats, mask)
    layers = te.model.layers
    sizes, fixed = P.split_blocks(te, layers)
    plan = P.plan_blocks(sizes, fixed, fixed + 3 * max(sizes), 0, 0, 1.0, 1e9)  # 1 resident, 4 streamed
    assert (len(plan.resident), plan.streamed, plan.buffers) == (1, (1, 2, 3, 4), 2)
    transfer = O.Transfer()
    with O.BlockStreamer(te, layers, plan, transfer) as s, torch.inference_mode():
        outs = [te(ids, pos, torch.float32, feats, mask) for _ in range(2)]
    assert all(torch.equal(o, reference) for o in outs)
    assert s.stats.copies == {1: 2, 2: 2, 3: 2, 4: 2} and transfer.peak <= plan.free


@pytest.mark.parametrize("card", ["8GB", "12GB", "16GB", "24GB"])
def test_real_8b_plan(card):
    """bf16 Qwen3-VL-8B (16.29 GB with the vision tower): its 36 layers stream on 8-16 GB cards, fit on 24 GB."""
    with torch.device("meta"):
        te = Qwen3VL(Qwen3VLConfig()).to(torch.bfloat16)
    c = CARDS[card]
    plan = P.plan_text_encoder(te, c.vram - FREE_LOSS, c, tokens=512, reserve=RESERVE)
    h, i, q, kv = 4096, 12288, 32 * 128, 8 * 128
    layer = 2 * (h * q * 2 + h * kv * 2 + 3 * h * i) + 2 * (2 * h + 2 * 128)
    assert plan.num_blocks == 36 and plan.block_bytes[0] == layer
    total = sum(p.numel() * 2 for p in te.parameters())
    assert 16.25e9 < total < 16.33e9  # 16.29 GB; Comfy-Org's qwen3vl_8b_bf16 (no lm_head) is listed as 16.33 GB
    if c.vram - FREE_LOSS - RESERVE < total:
        assert 0 < len(plan.resident) < 36 and plan.buffers >= 2
    else:
        assert len(plan.resident) == 36
