"""Weight streaming behind compute: an executor that runs a `Plan` (offload_plan.py) on a model, from outside.

The executor attaches to a model with PyTorch module hooks and never changes the model's code. Resident
blocks and everything outside the blocks are placed on the device once. Each streamed block is packed
once, at attach, into host slabs (pinned on CUDA); before the block runs, its parameters' `.data` point
at views of a device staging buffer its bytes were copied into, and after it back at the host copy.
Bytes move verbatim, so float8 stays float8 and `ops.Linear` upcasts it on the device per layer.

Ordering (the CUDA `Transfer`; the CPU one does the same copies synchronously):
- copies run on a dedicated copy stream; each waits for the "released" event of the ring slot it writes,
  recorded on the compute stream after the slot's previous block (copy-after-compute-release);
- a block waits on the compute stream for its copy's event before its kernels (compute-after-copy);
- streamed block q uses slot q mod K; copies are issued while fewer than K slots are pending, so while
  one block computes, the next K - 1 streamed blocks are copied (prefetch depth K - 1 >= 1);
- staging buffers are allocated once; `record_stream(copy_stream)` makes their eventual free wait for
  the copies too. Pinned sources are kept alive by PyTorch's host allocator until their copies finish.
A pass (one model forward = one sampling step, cond and uncond batched) moves each streamed block once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .offload_plan import ALIGN, Plan, slab_size
from .transfer import CudaTransfer, Transfer, default_transfer

__all__ = ["BlockStreamer", "CudaTransfer", "HostCopies", "Stats", "Transfer", "default_transfer"]

# ---------------------------------------------------------------------------------------------------------
# The executor
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Stats:
    """What the executor moved: per-pass streaming copies, and the one-time resident placement."""

    passes: int = 0  # completed model forwards
    bytes_moved: int = 0  # host -> device bytes of streaming copies
    load_bytes: int = 0  # bytes placed on the device at attach
    host_bytes: int = 0  # host (pinned) memory holding the streamed blocks
    fetched_bytes: int = 0  # bytes of skipped modules copied to the device because a forward ran them
    copies: Counter = field(default_factory=Counter)  # block index -> streaming copies


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers of a module tree, each once (the objects whose `.data` we swap)."""
    seen, out = set(), []
    for m in module.modules():
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


class _Packed:
    """A streamed block: its tensors packed at ALIGN offsets into host memory, with views for host and slots.
    `skip`: ids of tensors left out (left on the host); `last`: ids of tensors packed after all the others, so
    that the copy without them is a prefix of this one (`without`)."""

    def __init__(self, block: nn.Module, skip: frozenset[int] = frozenset(), last: frozenset[int] = frozenset()):
        tensors = [t for t in _tensors(block) if id(t) not in skip]
        self.tensors = [t for t in tensors if id(t) not in last] + [t for t in tensors if id(t) in last]
        self.offsets, off = [], 0
        for t in self.tensors:
            self.offsets.append(off)
            off += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        self.nbytes = off

    def without(self, skip: frozenset[int]) -> _Packed:
        """This filled copy less the tensors whose ids are in `skip`, which must be its last ones: a view of its
        first bytes (no second host copy)."""
        n = sum(1 for t in self.tensors if id(t) not in skip)
        if any(id(t) in skip for t in self.tensors[:n]):
            raise ValueError("the tensors left out must be the last ones packed")
        part = object.__new__(_Packed)
        part.tensors, part.offsets = self.tensors[:n], self.offsets[:n]
        part.nbytes = self.offsets[n] if n < len(self.tensors) else self.nbytes
        part.host, part.host_views = self.host[: part.nbytes], self.host_views[:n]
        return part

    def fill(self, host: torch.Tensor) -> None:
        """Copy the block's current tensors into `host` (uint8, nbytes long), once."""
        self.host = host
        for t, o in zip(self.tensors, self.offsets, strict=True):
            host[o : o + t.numel() * t.element_size()].copy_(t.detach().reshape(-1).view(torch.uint8))
        self.host_views = self.views(host)

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        return [
            buf[o : o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            for t, o in zip(self.tensors, self.offsets, strict=True)
        ]

    def bind(self, views: list[torch.Tensor]) -> None:
        for t, v in zip(self.tensors, views, strict=True):
            t.data = v


def pack_host(packed: Sequence[_Packed], transfer: Transfer) -> list[torch.Tensor]:
    """Allocate host slabs (pinned on CUDA) once and fill each block into its range; returns the slabs."""
    if not packed:
        return []
    size = slab_size([p.nbytes for p in packed])
    slabs, used = [transfer.host_buffer(size)], 0
    for p in packed:
        if used + p.nbytes > size:
            slabs.append(transfer.host_buffer(size))
            used = 0
        p.fill(slabs[-1][used : used + p.nbytes])
        used += p.nbytes
    return slabs


class HostCopies:
    """Packed host copies of a model's streamed blocks, made once and kept across attach / detach (so a
    component offloaded between jobs is not re-pinned each time); `release()` frees them.

    `tail`: modules some plans leave on the host (`BlockStreamer(skip=...)`, e.g. the modulation layers of a run
    that precomputes them) and others stream with their block: their tensors are packed last, so one host copy
    serves both kinds of plan (the copy without them is a prefix of the whole one)."""

    def __init__(self, tail: Sequence[nn.Module] = ()):
        self.packed: dict[tuple[int, frozenset[int]], _Packed] = {}  # (block, skipped tensor ids) -> its copy
        self.slabs: list[torch.Tensor] = []
        self.tail = frozenset(id(t) for m in tail for t in _tensors(m))

    @property
    def nbytes(self) -> int:
        return sum(s.numel() for s in self.slabs)

    def get(self, blocks: Sequence[nn.Module], indices: Sequence[int], transfer: Transfer,
            skip: frozenset[int] = frozenset()) -> dict[int, _Packed]:  # fmt: skip
        """The packed copies of blocks[i] for i in indices (without the tensors whose ids are in `skip`), packing
        (into new slabs) those not yet held."""
        base = frozenset() if skip and skip <= self.tail else skip  # a tail-only skip: a prefix of the whole copy
        new = {(i, base): _Packed(blocks[i], base, self.tail) for i in indices if (i, base) not in self.packed}
        self.slabs += pack_host(list(new.values()), transfer)
        self.packed.update(new)
        for i in indices:
            if (i, skip) not in self.packed:
                self.packed[i, skip] = self.packed[i, base].without(skip)
        return {i: self.packed[i, skip] for i in indices}

    def release(self, transfer: Transfer) -> None:
        transfer.free_host(self.slabs)
        self.packed, self.slabs = {}, []
        transfer.release_host()


class BlockStreamer:
    """Runs `plan` on `model`: resident weights placed once, streamed blocks copied through a ring.

    `blocks` are the model's blocks in execution order (e.g. `model.transformer_blocks`); `root`
    (default: the model) gets a pre-hook that starts the first copies before its forward. Use as a
    context manager, or `attach()` / `detach()`; detaching restores the original host tensors. `host`:
    packed host copies to reuse and keep (default: made at attach, dropped at detach). `skip`: modules whose
    tensors stay where they are, neither placed nor streamed (the modulation layers once precomputed, see
    `modulation.py`: the plan must be made without them, `plan_dit(modulation=True)`). A skipped module that
    runs all the same (a forward that computes its modulation per call) gets its tensors copied to the device
    for that call and given back after it (`Stats.fetched_bytes`): slower, never wrong.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module], plan: Plan, transfer: Transfer,
                 root: nn.Module | None = None, host: HostCopies | None = None,
                 skip: Sequence[nn.Module] = ()):  # fmt: skip
        if plan.num_blocks != len(blocks):
            raise ValueError(f"the plan is for {plan.num_blocks} blocks, the model has {len(blocks)}")
        if plan.streamed and plan.buffers < 1:
            raise ValueError("a plan that streams blocks needs at least one staging buffer")
        self.model, self.blocks, self.plan, self.transfer = model, list(blocks), plan, transfer
        self.root = model if root is None else root
        self.host, self._own_host = host or HostCopies(), host is None
        self.stats = Stats()
        self.skipped = tuple(skip)
        self._skip = frozenset(id(t) for m in skip for t in _tensors(m))
        self._fetched: dict[int, list] = {}  # id(skipped module) -> [(tensor, host data, device copy)] while it runs
        self._q = {b: q for q, b in enumerate(plan.streamed)}  # block index -> position among streamed
        self._attached = False

    # -- placement
    def attach(self, reuse: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> BlockStreamer:
        """Place the plan. `reuse`: {id(tensor): (host data, device copy)} kept from a previous plan's
        `detach(keep=...)`; those tensors are not copied again (re-planning without a full re-upload). The dict
        is consumed: kept copies this plan streams are dropped (their memory given back) before any tensor is
        placed, so re-planning never holds more than the larger of the two plans."""
        if self._attached:
            return self
        t, streamed = self.transfer, {id(x) for i in self.plan.streamed for x in _tensors(self.blocks[i])}
        streamed -= self._skip
        reuse = {} if reuse is None else reuse
        tensors = _tensors(self.model)
        self._originals = [(x, reuse[id(x)][0] if id(x) in reuse else x.data) for x in tensors]
        ids = {id(x) for x in tensors}
        for key in [k for k in reuse if k in streamed or k in self._skip or k not in ids]:
            t.free(reuse.pop(key)[1])  # the last reference to that device copy goes with it
        self._resident, self._stage = {}, []  # id(tensor) -> its device copy; staging buffers
        try:
            self._place(streamed, reuse)
        except BaseException:  # out of memory or a refused pin half-way: leave nothing placed behind
            for x, data in self._originals:
                x.data = data
            for buf in self._stage + list(self._resident.values()) + [d for _, d in reuse.values()]:
                t.free(buf)
            self._resident, self._stage, self._originals = {}, [], []
            raise
        k = len(self._stage)
        for p in self._packed.values():
            p.bind(p.host_views)
        self._copy_done: list = [None] * k
        # the buffers may reuse memory that compute issued before now still reads: first copies wait for it
        self._released_at: list = [t.release()] * k
        self._bound: set[int] = set()
        self._pos, self._issued, self._released = None, 0, 0
        self._hooks = [self.root.register_forward_pre_hook(self._pre_root),
                       self.root.register_forward_hook(self._post_root)]  # fmt: skip
        for i, b in enumerate(self.blocks):  # bind before any other pre-hook; release even if forward raises
            self._hooks.append(b.register_forward_pre_hook(self._pre_block(i), prepend=True))
            self._hooks.append(b.register_forward_hook(self._post_block(i), always_call=True))
        for m in self.skipped:
            self._hooks.append(m.register_forward_pre_hook(self._fetch, prepend=True))
            self._hooks.append(m.register_forward_hook(self._give_back, always_call=True))
        self._attached = True
        return self

    def _fetch(self, module, args) -> None:
        """A skipped module runs after all: its host tensors copied to the device for this call."""
        moved = []
        for x in _tensors(module):
            if id(x) in self._skip and not self.transfer.on_device(x):
                dev = self.transfer.to_device(x.data)
                moved.append((x, x.data, dev))
                x.data = dev
                self.stats.fetched_bytes += dev.numel() * dev.element_size()
        self._fetched[id(module)] = moved

    def _give_back(self, module, args, output) -> None:
        for x, data, dev in self._fetched.pop(id(module), ()):
            x.data = data
            self.transfer.free(dev)

    def _place(self, streamed: set[int], reuse: dict) -> None:
        """The resident copies, the packed host copies and the staging ring (attach's part that can fail)."""
        t = self.transfer
        for x, data in self._originals:
            if id(x) in self._skip:
                x.data = data  # left on the host: the forward does not read it
            elif id(x) not in streamed:
                kept = reuse.pop(id(x), None)
                dev = t.to_device(data) if kept is None else kept[1]
                x.data = dev
                self._resident[id(x)] = dev
                if kept is None:
                    self.stats.load_bytes += data.numel() * data.element_size()
            else:
                x.data = data
        self._packed = self.host.get(self.blocks, self.plan.streamed, t, self._skip)
        self.stats.host_bytes = self.host.nbytes
        k = self.plan.buffers if self._packed else 0
        size = max((p.nbytes for p in self._packed.values()), default=0)
        for _ in range(k):
            self._stage.append(t.device_buffer(size))
        self._views = {i: [p.views(s) for s in self._stage] for i, p in self._packed.items()}

    def detach(self, keep: bool = False) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Remove the hooks and put every tensor back on its original host memory (nothing is copied).

        keep=True leaves the resident device copies allocated and returns them for `attach(reuse=...)`."""
        if not self._attached:
            return {}
        for h in self._hooks:
            h.remove()
        self.transfer.synchronize()
        kept = {id(x): (data, self._resident[id(x)]) for x, data in self._originals if keep and id(x) in self._resident}
        for x, data in self._originals:
            x.data = data
        for buf in self._stage + ([] if keep else list(self._resident.values())):
            self.transfer.free(buf)
        self._stage, self._resident, self._packed, self._views, self._originals = [], {}, {}, {}, []
        if self._own_host:
            self.host.release(self.transfer)
        self._attached = False
        return kept

    def __enter__(self) -> BlockStreamer:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- the ring
    def _start(self, pos: int) -> None:
        """Begin a pass at block position `pos` (normally 0): unbind leftovers, then prefetch."""
        if self._bound or self._released != self._issued:  # an interrupted pass: unbind, fence every slot
            for i in self._bound:
                self._packed[i].bind(self._packed[i].host_views)
            self._bound.clear()
            self._released_at = [self.transfer.release()] * len(self._stage)  # after all compute so far
        # (after a complete pass each slot's last release marker stands, so the next copies may start early)
        first = sum(1 for b in self.plan.streamed if b < pos)
        self._pos, self._issued, self._released = pos, first, first
        self._pump()

    def _pump(self) -> None:
        """Issue copies while a ring slot is free: streamed block q may load once block q - K released."""
        k, streamed = len(self._stage), self.plan.streamed
        while self._issued < len(streamed) and self._issued < self._released + k:
            q, i = self._issued, streamed[self._issued]
            src = self._packed[i].host
            dst = self._stage[q % k][: src.numel()]
            self._copy_done[q % k] = self.transfer.copy(dst, src, self._released_at[q % k])
            self.stats.bytes_moved += src.numel()
            self.stats.copies[i] += 1
            self._issued += 1

    def _pre_root(self, module, args) -> None:
        self._start(0)

    def _post_root(self, module, args, output) -> None:
        self.stats.passes += 1

    def _pre_block(self, i: int):
        def hook(module, args):
            if self._pos != i:  # called out of the expected order (or without the root): resynchronise
                self._start(i)
            q = self._q.get(i)
            if q is not None:
                slot = q % len(self._stage)
                self.transfer.wait(self._copy_done[slot])
                self._packed[i].bind(self._views[i][slot])
                self._bound.add(i)
            self._pos = i + 1

        return hook

    def _post_block(self, i: int):
        def hook(module, args, output):
            q = self._q.get(i)
            if q is not None:
                self._released_at[q % len(self._stage)] = self.transfer.release()
                self._packed[i].bind(self._packed[i].host_views)
                self._bound.discard(i)
                self._released = q + 1
                self._pump()

        return hook
