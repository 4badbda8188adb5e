"""Block-causal attention of the Qwen-Image-2.1 DiT and the prefix K/V cache.

The mask is `q >= k or same image block` (see `layout.py`). It is never built as a matrix: a segment
(text run or image block) [start, end) attends to the keys [0, end), a text run with a causal triangle over
its own keys, an image block without a mask. The target, last, sees every key; so its queries need no mask
but the text padding's, and a step run from cached prefix keys is one plain attention call.

`PrefixCache` holds, per block, the prefix's keys and values after QK-norm and RoPE ([B, H, P, hd]). They
depend only on the condition (text and references are modulated at t = 0 and never see the target), so
they are computed once per run (`DiT21.prefill`) and reused by every step: the step then computes the
target's tokens only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..attention import attention

Attend = Callable[..., torch.Tensor]  # attention.attention's signature: (q, k, v, key_mask) -> out


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Sequence[tuple[int, int, bool]],
    key_valid: torch.Tensor | None = None,
    attend: Attend = attention,
) -> torch.Tensor:
    """Block-causal attention of the prefix: q, k, v [B, H, P, hd] of positions 0..P-1, `segments` (start, end,
    is_text) covering them in order; key_valid [B, P] bool (False: padding, never attended) or None.

    Image segments go through `attend` (the host's attention); text segments need a causal triangle beside
    the keys before them, so they run through SDPA with that boolean mask. Returns [B, H, P, hd]."""
    outs = []
    for start, end, is_text in segments:
        qs, ks, vs = q[:, :, start:end], k[:, :, :end], v[:, :, :end]
        if not is_text:
            outs.append(attend(qs, ks, vs, None if key_valid is None else key_valid[:, :end]))
            continue
        n = end - start
        allowed = torch.ones(n, end, dtype=torch.bool, device=q.device).tril(start)  # [n, end]: key <= query
        mask = allowed[None, None] if key_valid is None else allowed[None, None] & key_valid[:, None, None, :end]
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask))
    return torch.cat(outs, dim=2)


@dataclass
class PrefixCache:
    """Per-block prefix keys and values [B, H, P, hd] (post norm and RoPE), with what a step needs besides:
    the prefix's key padding [B, P] (or None), the running RoPE position after it, and its batch.

    `device`: where the keys and values are kept (None: where they were computed). A host device keeps a
    large cache (2048² references) out of the GPU: each block's pair is then copied to the compute device
    when the block runs (into pinned host memory at the prefill, so the copies are asynchronous)."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    key_valid: torch.Tensor | None = None  # [B, P] bool, False at padded text positions
    cursor: int = 0  # the target's RoPE frame position
    batch: int = 0  # rows of the condition (1 broadcasts over any image batch)
    prefix_len: int = 0
    device: torch.device | None = None  # storage of keys and values; None: the compute device

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        # a copy in any case: a view would keep the whole prefill activation alive for the run
        if self.device is None or torch.device(self.device) == t.device:
            return t.clone()
        pin = torch.device(self.device).type == "cpu" and t.device.type == "cuda"
        out = torch.empty(t.shape, dtype=t.dtype, device=self.device, pin_memory=pin)
        return out.copy_(t, non_blocking=pin)  # stream-ordered before the step's copy back

    def put(self, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if block != len(self.keys):
            raise RuntimeError(f"prefix cache filled out of order (block {block} after {len(self.keys)})")
        self.keys.append(self._keep(k))
        self.values.append(self._keep(v))

    def get(self, block: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `block`'s keys and values on `device` (default: where they are kept)."""
        if block >= len(self.keys):
            raise RuntimeError(f"the prefix cache holds {len(self.keys)} blocks; block {block} was asked for")
        k, v = self.keys[block], self.values[block]
        if device is not None and k.device != torch.device(device):
            k, v = k.to(device, non_blocking=k.is_pinned()), v.to(device, non_blocking=v.is_pinned())
        return k, v

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def cache_bytes(num_layers: int, hidden: int, prefix_tokens: int, batch: int, element_size: int) -> int:
    """Bytes a `PrefixCache` takes: keys and values of every block, [batch, prefix_tokens, hidden] each."""
    return 2 * num_layers * batch * prefix_tokens * hidden * element_size
