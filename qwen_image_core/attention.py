"""The one attention entry point of the package (PyTorch SDPA), and `per_row`, which runs rows whose keys are
padded to different lengths without a key mask (a mask rules out the flash kernels on GPUs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# PyTorch >= 2.5 computes grouped-query attention in SDPA itself (no K/V copies)
GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None, causal: bool = False
) -> torch.Tensor:
    """Scaled dot-product attention, scale 1/sqrt(head_dim).

    q [B, H, Lq, D], k/v [B, Hkv, Lk, D] (Hkv divides H: grouped-query attention, through SDPA's own support
    where PyTorch has it (>= 2.5), else K/V expanded here); key_mask [B, Lk] bool, True where a key may be
    attended, or None; causal: each query sees only keys at or before its position (not combined with
    key_mask). Returns [B, H, Lq, D].
    """
    gqa = {}
    if k.shape[1] != q.shape[1]:
        if GQA:
            gqa = {"enable_gqa": True}
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if causal:
        if key_mask is not None:
            raise ValueError("causal attention takes no key mask (right padding needs none)")
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    mask = None if key_mask is None else key_mask[:, None, None, :].to(torch.bool)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)


def per_row(attend, lengths: Sequence[int], padded: int):
    """An attention function for rows whose first `padded` keys are `lengths[b]` real ones then padding (the
    joint [text | image] sequence of a batch of prompts): each row attends to its real keys only, as a key mask
    would, but with no mask (its keys are gathered: the real text keys, then the rest). `lengths` are host ints,
    so nothing waits for the device."""

    def attend_rows(q, k, v, key_mask=None, causal=False):
        outs = []
        for b, n in enumerate(lengths):
            rows = slice(b, b + 1)
            if n < padded:
                kb = torch.cat([k[rows, :, :n], k[rows, :, padded:]], dim=2)
                vb = torch.cat([v[rows, :, :n], v[rows, :, padded:]], dim=2)
            else:
                kb, vb = k[rows], v[rows]
            outs.append(attend(q[rows], kb, vb))
        return torch.cat(outs)

    return attend_rows


def text_keys(attend, batch: int, n_text: int, txt_lengths: Sequence[int] | None, txt_mask: torch.Tensor | None):
    """How a batch of padded prompts attends: -> (attention function, text key mask [B, L] or None).

    `txt_lengths` (host ints, one per row or one for all) give `per_row` and no mask: nothing waits for the
    device. A `txt_mask` alone [B, L] (True = real token) is looked at once (one wait on the device) and kept
    only if some token is padding; the caller appends the image keys' True columns."""
    if txt_lengths is not None:
        lengths = [int(n) for n in txt_lengths] * (batch if len(txt_lengths) == 1 else 1)
        if len(lengths) != batch:
            raise ValueError(f"txt_lengths has {len(txt_lengths)} entries for a batch of {batch}")
        return (per_row(attend, lengths, n_text) if min(lengths) < n_text else attend), None
    if txt_mask is not None and not bool(txt_mask.all()):
        return attend, txt_mask.to(torch.bool)
    return attend, None
