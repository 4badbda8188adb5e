"""Batched CFG without a key mask (issue 13, 2 and 5): prompts of different lengths in one batch attend per row to
their real keys (`attention.per_row`, host lengths, no mask, nothing waits on the device), which equals the masked
attention; the text encoder's grouped-query attention uses SDPA's own GQA support instead of copying K/V."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qwen_image_core.attention import attention, per_row
from qwen_image_core.formats.common import assign_weights
from qwen_image_core.mmdit import MMDiT
from qwen_image_core.sampling import CFGDenoiser
from tools.checkpoints import dit as D


class Syncs(TorchDispatchMode):
    """Counts the ops that copy a value to the host (what .item(), bool() and .tolist() do)."""

    def __init__(self):
        super().__init__()
        self.count, self.masked_sdpa = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if "scaled_dot_product" in str(func) and isinstance(mask, torch.Tensor):
            self.masked_sdpa += 1
        return func(*args, **kwargs)


def dit():
    cfg = D.tiny_config()
    with torch.device("meta"):
        model = MMDiT(cfg)
    return assign_weights(model, D.state_dict(cfg, seed=2), {}, "tiny", "Qwen-Image DiT").eval(), cfg


def test_per_row_attention_equals_the_key_mask():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
    lengths, padded = [4, 2], 4  # row 0: 4 text keys, row 1: 2 (+2 padding); then 5 image keys
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 2:4] = False
    ref = attention(q, k, v, mask)
    assert torch.allclose(per_row(attention, lengths, padded)(q, k, v), ref, atol=1e-6)


def test_cfg_of_different_lengths_runs_unmasked_and_without_host_syncs():
    model, cfg = dit()
    x, sigma = torch.randn(1, 16, 6, 8), torch.tensor([0.7])
    cond, uncond = torch.randn(1, 7, cfg.text_dim), torch.randn(1, 3, cfg.text_dim)
    velocity = lambda x, s, txt, mask=None, ref_latents=None, txt_lengths=None: model(  # noqa: E731
        x, s, txt, mask, ref_latents=ref_latents, txt_lengths=txt_lengths
    )
    with torch.no_grad():
        separate = [x - 0.7 * model(x, sigma, c) for c in (cond, uncond)]  # each prompt alone, no padding
        reference = separate[1] + 3.0 * (separate[0] - separate[1])
        with Syncs() as seen:
            batched = CFGDenoiser(velocity, 3.0, None)(x, sigma, cond, uncond)
    assert torch.allclose(batched, reference, atol=1e-5 * float(reference.abs().max()))
    assert seen.count == 0 and seen.masked_sdpa == 0


def test_a_given_mask_still_works():
    model, cfg = dit()
    x, t = torch.randn(2, 16, 4, 4), torch.tensor([0.5, 0.5])
    txt = torch.randn(2, 5, cfg.text_dim)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        with Syncs() as masked:
            a = model(x, t, txt, mask)
        b = model(x, t, txt, txt_lengths=[5, 3])
    assert torch.allclose(a, b, atol=1e-5 * float(a.abs().max()))
    assert masked.masked_sdpa > 0 and masked.count == 1  # (the counter sees masks and syncs where they are)


def test_grouped_query_attention_copies_no_keys():
    """The text encoder's GQA (28 query heads on 4 K/V heads) through SDPA's own support: equal to expanding K/V,
    and no repeat_interleave copy is made."""
    import qwen_image_core.attention as A

    q, k, v = torch.randn(1, 8, 10, 16), torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    expanded = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    ops = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops():
        out = A.attention(q, k, v, causal=True)
    assert A.GQA and torch.allclose(out, expanded, atol=1e-6)
    assert not any("repeat_interleave" in o or "index_select" in o for o in ops), ops
