"""The joint token sequence of the Qwen-Image-2.1 DiT: [prefix (text and references, interleaved) | target].

The condition encoder (Qwen3-VL) sees the prompt with a run of image slots per reference; each slot covers
2 x 2 latent tokens of that reference. The DiT replaces every reference's slots by the reference's own latent
tokens (4 per slot, row-major) and appends the target image's tokens after the whole prompt, so the prefix is
text pieces and reference blocks in prompt order and the target comes last.

Attention is block-causal: every token sees all tokens before it; text tokens see only those (token-level
causal), each image block (a reference or the target) is bidirectional inside. Because nothing in the prefix
sees the target, the prefix's keys and values do not depend on the step and can be cached (`attention.py`).

RoPE positions (as diffusers' `QwenImage21Rope`): a running position advances by one per text token, on all
three axes; an image block sits at the running position on the frame axis, its rows and columns centred on
zero (-(n - n//2) .. n//2 - 1), and advances the position by max(h, w).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import rope

SLOT_TOKENS = 4  # latent tokens per image slot of the condition encoder (a 2 x 2 group)
MAX_REFERENCES = 10  # the most references Qwen-Image-2.1 takes (<image1> .. <image10>)


@dataclass(frozen=True)
class Piece:
    """One run of the prefix: text tokens `source` (a slice of the encoder sequence) or reference `ref`."""

    start: int  # first joint position
    end: int  # one past the last joint position
    source: slice | None = None  # text: the encoder positions it takes its tokens from
    ref: int | None = None  # image: the reference index
    grid: tuple[int, int] = (0, 0)  # image: its token grid (h, w)

    @property
    def is_text(self) -> bool:
        return self.ref is None


@dataclass(frozen=True)
class Layout:
    """Where each prefix token comes from, the attention segments and the RoPE positions of the prefix."""

    pieces: tuple[Piece, ...]  # in sequence order
    positions: torch.Tensor  # [P, 3] (frame, row, col) of the prefix, int64 on the CPU
    cursor: int  # running position after the prefix: the target's frame

    @property
    def prefix_len(self) -> int:
        return self.pieces[-1].end if self.pieces else 0

    @property
    def segments(self) -> tuple[tuple[int, int, bool], ...]:
        """(start, end, is_text) attention segments of the prefix."""
        return tuple((p.start, p.end, p.is_text) for p in self.pieces)

    def text_positions(self) -> list[tuple[slice, slice]]:
        """(joint positions, encoder positions) of every text piece."""
        return [(slice(p.start, p.end), p.source) for p in self.pieces if p.is_text]


def build_layout(text_len: int, image_slots: torch.Tensor | None, ref_grids: list[tuple[int, int]]) -> Layout:
    """The prefix layout of an encoder sequence of `text_len` positions whose `image_slots` [text_len] bool
    (None: no images) mark the references' slots, the references having token grids `ref_grids` (h, w) in
    prompt order. Each reference needs h*w/4 consecutive slots; a mismatch is a ValueError naming it."""
    if len(ref_grids) > MAX_REFERENCES:
        raise ValueError(f"{len(ref_grids)} references: Qwen-Image-2.1 takes at most {MAX_REFERENCES}")
    slots = [] if image_slots is None else [bool(s) for s in image_slots.reshape(-1).tolist()]
    if slots and len(slots) != text_len:
        raise ValueError(f"image_slots has {len(slots)} entries for {text_len} condition tokens")
    need = []
    for i, (h, w) in enumerate(ref_grids):
        if (h * w) % SLOT_TOKENS:
            raise ValueError(f"reference {i + 1}: a {h}x{w} token grid does not fill whole 2x2 image slots")
        need.append(h * w // SLOT_TOKENS)
    if sum(slots) != sum(need):
        raise ValueError(
            f"the condition has {sum(slots)} image slots but the {len(ref_grids)} reference latents need {sum(need)}"
        )
    pieces, pos, joint, position, k, ref = [], [], 0, 0, 0, 0
    while k < text_len:
        if not slots or not slots[k]:  # a run of text
            end = k
            while end < text_len and not (slots and slots[end]):
                end += 1
            n = end - k
            pieces.append(Piece(joint, joint + n, source=slice(k, end)))
            pos.append(torch.arange(position, position + n)[:, None].expand(n, 3))
            joint, position, k = joint + n, position + n, end
            continue
        h, w = ref_grids[ref]  # this reference's slots must all be image slots
        if not all(slots[k : k + need[ref]]):
            raise ValueError(f"reference {ref + 1}: its {need[ref]} image slots are not consecutive in the condition")
        pieces.append(Piece(joint, joint + h * w, ref=ref, grid=(h, w)))
        pos.append(rope.image_positions(position, h, w))
        joint, position, k, ref = joint + h * w, position + max(h, w), k + need[ref], ref + 1
    positions = torch.cat(pos) if pos else torch.zeros(0, 3, dtype=torch.long)
    return Layout(tuple(pieces), positions, position)


def target_positions(cursor: int, h: int, w: int, device=None) -> torch.Tensor:
    """RoPE positions [h*w, 3] of the target's tokens after a prefix ending at `cursor`."""
    return rope.image_positions(cursor, h, w, device)
