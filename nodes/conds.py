"""Model conditions (ComfyUI `comfy.conds` types) that let prompts of different lengths share one batch.

ComfyUI batches the entries of a sampling step (cond and uncond, ConditioningCombine parts) into one model
call when their conditions can be concatenated. Qwen-Image prompts rarely have the same number of tokens,
so with ComfyUI's own `CONDRegular` every entry runs alone. `CONDPaddedTokens` right-pads the prompt
embeddings with zeros instead, and `CONDTextLengths` carries each row's real length as host integers: the
model lets each row attend to its real keys only (no key mask, nothing to read back from the device), so the
batched call gives what separate calls give, and CFG costs one pass over the weights, not two.
"""

from __future__ import annotations

import comfy.conds
import torch
import torch.nn.functional as F


class CONDPaddedTokens(comfy.conds.CONDRegular):
    """[B, L, D] token embeddings, concatenable with any L (right-padded with `pad` to the longest)."""

    pad = 0.0

    def can_concat(self, other) -> bool:
        a, b = self.cond, other.cond
        return a.ndim == b.ndim and a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:] and a.device == b.device

    def concat(self, others) -> torch.Tensor:
        conds = [self.cond, *(o.cond for o in others)]
        length = max(c.shape[1] for c in conds)
        return torch.cat([self._pad(c, length) for c in conds])

    def _pad(self, c: torch.Tensor, length: int) -> torch.Tensor:
        return F.pad(c, (0, 0, 0, length - c.shape[1]), value=self.pad)


class CONDTextLengths(comfy.conds.CONDRegular):
    """The real token count of each row of a padded text batch: a list of ints, never on a device."""

    def process_cond(self, batch_size, **kwargs):
        rows = self.cond if len(self.cond) == batch_size else self.cond * (batch_size // len(self.cond))
        return self._copy_with(list(rows))

    def can_concat(self, other) -> bool:
        return True

    def concat(self, others) -> list[int]:
        return [n for c in (self, *others) for n in c.cond]

    def size(self):
        return [len(self.cond)]
