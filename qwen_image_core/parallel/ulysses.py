"""Ulysses sequence parallelism for the Qwen-Image DiT (Jacobs et al. 2023, arXiv 2309.14509).

Every rank holds the whole DiT, the whole text stream and a contiguous shard of the image tokens (target,
then references): [r*ni, (r+1)*ni) with ni = ceil(N / P) for P ranks, the last shard padded at its end.
The text is not split (xDiT's "joint tensor" handling of the text: the L text tokens are a few percent of
the sequence, their per-token work is repeated on each rank, and prompts of any length need no padding).
Everything but attention is per token, so the model's own blocks run on [text | image shard] unchanged,
with the RoPE rows and (Edit-2511, zero_cond_t) the modulation split of the shard. Attention: one
all-to-all over heads gives each rank the whole image sequence for H / P heads, in order with the padding
cut off; the rank's own H / P heads of the text go in front, so the attention call is exactly the
single-process one (order [text | target | references], its text mask, its per-row lengths). A second
all-to-all returns the image shard for all heads, and an all-gather over heads completes the text. After
the last block every rank gathers the image stream and finishes the forward itself: all ranks return the
same velocity.

Bytes per block each rank sends (as many arrive): (P - 1) / P of 4 x B x ni x hidden (q, k, v and the
output) plus (P - 1) / P of B x L x hidden (the text output), in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..attention import attention, text_keys


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Shards:
    """Where the N image tokens of one forward live over `world` ranks (the text is on every rank)."""

    image: int  # N: target + reference tokens
    world: int  # P: ranks
    rank: int  # this rank

    @property
    def ni(self) -> int:  # image tokens per rank (the last shard's tail is padding)
        return ceil_div(self.image, self.world)

    def image_index(self, device=None) -> torch.Tensor:
        """[ni] this rank's token indices; padding repeats the last token (its output is dropped and, as a key,
        it is cut off), so every row of the shard holds finite numbers."""
        idx = torch.arange(self.rank * self.ni, (self.rank + 1) * self.ni, device=device)
        return idx.clamp(max=self.image - 1)

    def targets(self, n_target: int) -> int:
        """Target tokens at the start of this rank's image shard (the rest are references or padding)."""
        return min(max(n_target - self.rank * self.ni, 0), self.ni)


def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all over dim 0 ([P, ...]: part i goes to rank i; part j of the result came from rank j)."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after contiguous(): empty_like keeps a permuted tensor's strides
    dist.all_to_all_single(out, x, group=group)
    return out


def ulysses_attention(shards: Shards, inner: Callable, key_mask: torch.Tensor | None, group=None) -> Callable:
    """An attention function (`attention.attention`'s signature) for a rank's q, k, v [B, H, L + ni, hd]
    ([whole text | image shard]): `inner(q, k, v, key_mask)` on H / P heads of the single-process sequence
    (`key_mask` [B, L + N] in its order, or None). Returns [B, H, L + ni, hd]."""
    world, rank, n, ni = shards.world, shards.rank, shards.image, shards.ni

    def attend(q, k, v, mask=None, causal=False):
        if mask is not None or causal:
            raise ValueError("ulysses attention takes its key mask at construction (the whole sequence's)")
        b, h, s, d = q.shape
        if h % world:
            raise ValueError(f"sequence parallel: {h} heads do not split over {world} ranks")
        hp, lt = h // world, s - ni  # heads per rank, text tokens
        qkv = torch.stack([q, k, v])  # [3, B, H, L + ni, hd]
        img = qkv[..., lt:, :].unflatten(2, (world, hp)).permute(2, 0, 1, 3, 4, 5)  # [P, 3, B, H/P, ni, hd]
        img = _exchange(img, group)  # [P (source rank = image shard), 3, B, H/P, ni, hd]
        img = img.permute(1, 2, 3, 0, 4, 5).reshape(3, b, hp, world * ni, d)[..., :n, :]  # padding cut off
        joint = torch.cat([qkv[:, :, rank * hp : (rank + 1) * hp, :lt], img], dim=3)  # [3, B, H/P, L + N, hd]
        out = inner(joint[0], joint[1], joint[2], key_mask)  # [B, H/P, L + N, hd]
        img_out = F.pad(out[:, :, lt:], (0, 0, 0, world * ni - n)).unflatten(2, (world, ni))
        img_out = _exchange(img_out.permute(2, 0, 1, 3, 4), group)  # [P (source rank = head group), B, H/P, ni, hd]
        txt_out = _gather(out[:, :, :lt], group)  # [P (head group), B, H/P, L, hd]
        return torch.cat([txt_out, img_out], dim=3).permute(1, 0, 2, 3, 4).reshape(b, h, s, d)

    return attend


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    """all_gather into a new leading dim [P, ...] (part j from rank j)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def gather_tokens(x: torch.Tensor, total: int, group=None) -> torch.Tensor:
    """Each rank's [B, n, D] shard -> the whole stream [B, total, D] on every rank."""
    return _gather(x, group).permute(1, 0, 2, 3).flatten(1, 2)[:, :total]


def _ref_tokens(ref_latents, patch: int) -> int:
    return sum(ceil_div(r.shape[-2], patch) * ceil_div(r.shape[-1], patch) for r in ref_latents or [])


class SequenceParallel:
    """`MMDiT.forward` with the image tokens split over the ranks of `group` and the text on every rank
    (torch.distributed, initialised; gloo on CPU, NCCL on GPUs). Call it as the model, on every rank with the
    same inputs; it runs the model's own forward and blocks (through its block hook, so an offload executor's
    module hooks still stream the blocks) and returns the same velocity on every rank.

    Not supported (a clear error): a caller's block hook (ControlNet residuals, block patches), whose
    residuals are whole-sequence tensors."""

    def __init__(self, model, group=None):
        self.model, self.group = model, group

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    def __call__(
        self,
        img: torch.Tensor,
        timestep: torch.Tensor,
        txt: torch.Tensor,
        txt_mask: torch.Tensor | None = None,
        ref_latents: list[torch.Tensor] | None = None,
        *,
        block_hook=None,
        attention_fn: Callable | None = None,
        txt_lengths: Sequence[int] | None = None,
        step_mod=None,
        **kwargs,
    ) -> torch.Tensor:
        if block_hook is not None:
            raise ValueError(
                "sequence parallel: block hooks (ControlNet residuals, block patches) are not supported; "
                "run this job on one device"
            )
        model, b = self.model, img.shape[0]
        # the model's own rule (MMDiT.forward), on the single-process order; the text key mask is completed
        # with the image keys once their number is known
        txt_mask = None if txt_mask is None else txt_mask.to(img.device)
        inner, key_mask = text_keys(attention_fn or attention, b, txt.shape[1], txt_lengths, txt_mask)
        n_refs = _ref_tokens(ref_latents, model.config.patch_size)
        blocks = model.transformer_blocks
        state = {}

        def hook(i, run, h, c, temb, pe):
            if i == 0:  # split: the image stream, its RoPE rows and modulation, and the attention
                shards = Shards(h.shape[1], self.world, dist.get_rank(self.group))
                ii, lt = shards.image_index(h.device), c.shape[1]
                mask = key_mask
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(b, h.shape[1])], dim=1)
                state.update(
                    shards=shards,
                    pe=torch.cat([pe[:lt], pe[lt:].index_select(0, ii)]),
                    attend=ulysses_attention(shards, inner, mask, self.group),
                    n_zero=shards.targets(h.shape[1] - n_refs) if temb.shape[0] == 2 * b else None,
                    mods=[None] * len(blocks) if step_mod is None else step_mod.blocks(temb, b),
                )
                h = h.index_select(1, ii)
            s = state
            h, c = blocks[i](h, c, temb, s["pe"], None, s["n_zero"], s["attend"], s["mods"][i])
            if i == len(blocks) - 1:
                h = gather_tokens(h, s["shards"].image, self.group)
            return h, c

        return model(
            img, timestep, txt, txt_mask, ref_latents, block_hook=hook, attention_fn=attention_fn,
            txt_lengths=txt_lengths, step_mod=step_mod, **kwargs,
        )  # fmt: skip
