"""Offload planning: which blocks of a model stay on the GPU, which stream from host memory, and how fast.

A plan is made from numbers only (so it is deterministic and testable without a GPU; the costs are in
`costs.py`): the free device memory, a reserve, each block's bytes in its storage dtype (float8 = 1 byte
per parameter, bf16 = 2), the bytes of everything outside the blocks, an activation estimate, and a time
model (compute per block from FLOPs and the card's TFLOPS x MFU, copy per block from bytes and the pinned
host-to-device bandwidth).

Streamed blocks are spread evenly among the resident ones, so each copy hides behind the compute of the
blocks before it (the aggregate condition "streamed bytes / bandwidth <= compute time" suffices rather
than the per-block one). `simulate` replays one step through the copy engine and the compute stream with
a ring of staging buffers, which is how the executor in `offload.py` orders them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .costs import (  # noqa: F401  (re-exported: the planner's inputs)
    CARDS,
    FLOP_PER_CLOCK_PER_SM,
    GB,
    Card,
    DiTWorkload,
    GiB,
    card_from_properties,
    detect_card,
    dit_activation_bytes,
    dit_block_flops,
    sampling_bytes,
    text_encoder_activation_bytes,
    text_encoder_layer_flops,
)
from .modulation import modulation_layers

ALIGN = 256  # bytes: the executor packs each tensor of a streamed block at this alignment


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers in their storage dtypes, each rounded up to ALIGN (as
    the executor packs them); works on the meta device too."""
    tensors = [*module.parameters(), *(b for b in module.buffers() if b is not None)]
    return sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in tensors)


def storage_label(module: nn.Module) -> str:
    """The storage holding most of a module's bytes, as a short name (fp8, bf16, fp16, fp32; for packed weights
    their format's kind or name: int8, nvfp4, gguf Q4_K, ...)."""
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    by_label: dict[str, int] = {}
    for m in module.modules():
        quant = getattr(m, "quant", None)
        for name, p in m.named_parameters(recurse=False):
            if quant is not None and name == "weight":
                label = getattr(quant, "kind", None) or quant.name
            else:
                label = names.get(p.dtype, "fp8")
            by_label[label] = by_label.get(label, 0) + p.numel() * p.element_size()
    if not by_label:
        return "-"
    return max(by_label, key=lambda k: (by_label[k], k))


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------


class PlanError(RuntimeError):
    """Not even the staging buffers and activations fit in the free memory."""


def stream_order(n: int) -> tuple[int, ...]:
    """The order in which n blocks start streaming as the device budget shrinks: block n - 1 first, block 0
    last, and every prefix spread evenly (van der Corput positions: 1, 1/2, 1/4, 3/4, ... from the end).

    Plans stream a prefix of this one order, so the streamed sets of different budgets are nested: a
    smaller budget only adds blocks to stream, a larger one only makes streamed blocks resident, and the
    pinned host copies of one plan serve every smaller one."""
    order, seen, k = [], set(), 0
    while len(order) < n:
        v, f, i = 0.0, 0.5, k  # the k-th van der Corput number (bits of k mirrored after the point)
        while i:
            v, f, i = v + f * (i & 1), f / 2, i >> 1
        block = n - 1 - int(v * n)
        if block not in seen:
            seen.add(block)
            order.append(block)
        k += 1
    return tuple(order)


def interleave(n: int, streamed: int) -> tuple[int, ...]:
    """The `streamed` of n blocks a plan streams (sorted): the first `streamed` of `stream_order(n)`, spread
    evenly, the last block streaming and the first resident (its compute hides the first copy) unless all stream."""
    return tuple(sorted(stream_order(n)[:streamed]))


def simulate(compute_s: Sequence[float], copy_s: Sequence[float], streamed: Sequence[int], buffers: int) -> float:
    """Seconds of one pass through the blocks with copies on a separate engine (the executor's ordering).

    The copy of the q-th streamed block starts when the previous copy is done and its ring slot
    (q mod buffers) has been released by the compute of streamed block q - buffers; a block computes
    after the one before it and, if streamed, after its copy. Copies start with the pass.
    """
    order = {b: q for q, b in enumerate(streamed)}
    copy_end: list[float] = []
    release: list[float] = []
    t = 0.0
    for i, c in enumerate(compute_s):
        q = order.get(i)
        if q is not None:
            for k in range(len(copy_end), q + 1):  # block s_(k - buffers) has computed: its slot is known
                slot_free = release[k - buffers] if k >= buffers else 0.0
                start = max(copy_end[-1] if copy_end else 0.0, slot_free)
                copy_end.append(start + copy_s[streamed[k]])
            t = max(t, copy_end[q])
        t += c
        if q is not None:
            release.append(t)
    return t


@dataclass(frozen=True)
class Plan:
    """Which blocks stay on the device, which stream through `buffers` staging buffers, and the estimates."""

    name: str  # what is planned, e.g. "RTX 4070 12 GB, 1328x1328 CFG"
    storage: str  # fp8 / bf16 / ...
    num_blocks: int
    streamed: tuple[int, ...]  # block indices copied in every pass
    buffers: int  # staging buffers in the ring (0 when nothing streams); prefetch depth = buffers - 1
    block_bytes: tuple[int, ...]
    fixed_bytes: int  # everything outside the blocks, always resident
    staging_bytes: int  # one staging buffer (the largest streamed block)
    activation_bytes: int  # the estimate kept free for activations
    reserve: int  # kept free besides (allocator slack, workspaces, the display)
    free: int  # device bytes the plan was made for
    compute_s: float  # per step, all blocks
    step_s: float  # per step, with copies (simulated)

    @property
    def resident(self) -> tuple[int, ...]:
        s = set(self.streamed)
        return tuple(i for i in range(self.num_blocks) if i not in s)

    @property
    def resident_bytes(self) -> int:
        return sum(self.block_bytes[i] for i in self.resident)

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied to the device per pass (= per step: cond and uncond share the pass)."""
        return sum(self.block_bytes[i] for i in self.streamed)

    @property
    def device_bytes(self) -> int:
        """Weight bytes on the device while the model runs: fixed + resident blocks + the staging ring."""
        return self.fixed_bytes + self.resident_bytes + self.buffers * self.staging_bytes

    @property
    def exposed_s(self) -> float:
        return max(0.0, self.step_s - self.compute_s)

    @property
    def spare(self) -> int:
        """Device bytes left beside this model while it stays placed (e.g. a VAE `budget=`)."""
        return max(0, self.free - self.reserve - self.device_bytes)

    def explain(self) -> str:
        n, r = self.num_blocks, len(self.resident)
        text = f"{self.name}: {r}/{n} blocks resident ({self.resident_bytes / GB:.1f} GB {self.storage})"
        if self.streamed:
            text += f", {len(self.streamed)} streamed via {self.buffers} buffers"
        return text + f", est. {self.exposed_s:.2f} s/step exposed copy"


def plan_blocks(
    block_bytes: Sequence[int],
    fixed_bytes: int,
    free: int,
    reserve: int,
    activation_bytes: int,
    block_compute_s: float | Sequence[float],
    h2d_bytes_per_s: float,
    name: str = "device",
    storage: str = "",
    max_resident: int | None = None,
    ring_sizes: Sequence[int] = (2, 3, 4),
) -> Plan:
    """The plan with the shortest simulated step that fits in `free - reserve - activation_bytes`.

    For each ring size k the most resident blocks that fit are kept (streamed ones interleaved); among
    those candidates the fastest wins, ties going to more resident blocks, then the smaller ring.
    `max_resident` caps the resident count (out-of-memory recovery). `block_compute_s`: seconds per block, one
    figure for all or one per block (a ControlNet's blocks before the DiT's, `control_offload.py`). Deterministic.
    """
    n = len(block_bytes)
    budget = free - reserve - activation_bytes - fixed_bytes  # for blocks and staging
    cap = n if max_resident is None else max(0, min(n, max_resident))
    compute = list(block_compute_s) if isinstance(block_compute_s, Sequence) else [block_compute_s] * n
    if len(compute) != n:
        raise ValueError(f"block_compute_s: {len(compute)} figures for {n} blocks")
    copy = [b / h2d_bytes_per_s for b in block_bytes]

    def make(streamed: tuple[int, ...], k: int) -> Plan:
        staging = max((block_bytes[i] for i in streamed), default=0)
        return Plan(name, storage, n, streamed, k, tuple(block_bytes), fixed_bytes, staging, activation_bytes,
                    reserve, free, sum(compute), simulate(compute, copy, streamed, max(k, 1)))  # fmt: skip

    if cap == n and sum(block_bytes) <= budget:
        return make((), 0)
    best: Plan | None = None
    for k in ring_sizes:
        for resident in range(min(cap, n - 1), -1, -1):
            streamed = interleave(n, n - resident)
            ring = min(k, len(streamed))
            staging = max(block_bytes[i] for i in streamed)
            if sum(block_bytes) - sum(block_bytes[i] for i in streamed) + ring * staging <= budget:
                cand = make(streamed, ring)
                key = (round(cand.step_s, 9), -resident, ring)
                if best is None or key < (round(best.step_s, 9), -len(best.resident), best.buffers):
                    best = cand
                break
    if best is None:
        need = fixed_bytes + activation_bytes + reserve + min(2, n) * max(block_bytes, default=0)
        raise PlanError(
            f"{name}: {free / GB:.1f} GB free is not enough to stream this model: it needs {need / GB:.1f} GB "
            f"(2 staging buffers of {max(block_bytes, default=0) / GB:.2f} GB, {activation_bytes / GB:.1f} GB "
            f"activations, {fixed_bytes / GB:.2f} GB non-block weights, {reserve / GB:.1f} GB reserve)"
        )
    return best


def split_blocks(
    model: nn.Module, blocks: Sequence[nn.Module], skip: Sequence[nn.Module] = ()
) -> tuple[list[int], int]:
    """(bytes of each block, bytes of the rest of the model), without the modules in `skip` (layers that stay on
    the host, e.g. the modulation layers once their outputs are precomputed: `modulation.py`)."""
    skipped = {id(m): tensor_bytes(m) for m in skip}
    sizes = [tensor_bytes(b) - sum(skipped.get(id(m), 0) for m in b.modules()) for b in blocks]
    return sizes, tensor_bytes(model) - sum(sizes) - sum(skipped.values())


def plan_dit(model: nn.Module, free: int, card: Card, workload: DiTWorkload | None = None, reserve: int = GiB,
             max_resident: int | None = None, activation_bytes: int | None = None, modulation: bool = False,
             steps: int = 20) -> Plan:  # fmt: skip
    """Plan an MMDiT (its `transformer_blocks`) for a workload on a card with `free` device bytes.

    activation_bytes: what to keep free for activations (None: the workload's estimate; 0 when the caller's
    budget already excludes them, as ComfyUI's does). modulation: the AdaLN modulation is precomputed for the
    run (`modulation.precompute`, `steps` steps): its weights leave the blocks' bytes (they stay on the host and
    are read once per run) and the table of its outputs is kept free instead."""
    cfg, workload = model.config, workload or DiTWorkload()
    skip = [m for _, m in modulation_layers(model)] if modulation else []
    sizes, fixed = split_blocks(model, model.transformer_blocks, skip)
    if modulation:  # the table: per step, per block img [R, 6D] + txt [rows, 6D], and norm_out's [rows, 2D]
        r = workload.rows * (2 if workload.references and cfg.zero_cond_t else 1)
        row_bytes = cfg.hidden * workload.compute_bytes
        fixed += steps * (len(sizes) * (r + workload.rows) * 6 + 2 * workload.rows) * row_bytes
    flops = dit_block_flops(workload, cfg.hidden, cfg.mlp_dim)
    if activation_bytes is None:
        activation_bytes = dit_activation_bytes(workload, cfg.hidden, cfg.mlp_dim)
    return plan_blocks(
        sizes, fixed, free, reserve, activation_bytes,
        flops / (card.tflops * 1e12 * card.mfu), card.h2d_gbps * GB,
        name=f"{card.name}, {workload.describe()}{', modulation precomputed' if modulation else ''}",
        storage=storage_label(model.transformer_blocks),
        max_resident=max_resident,
    )  # fmt: skip


def plan_text_encoder(model: nn.Module, free: int, card: Card, tokens: int = 512, batch: int = 1,
                      reserve: int = GiB, max_resident: int | None = None,
                      activation_bytes: int | None = None) -> Plan:  # fmt: skip
    """Plan a QwenVL encoder: its 28 decoder layers (`model.model.layers`) stream, the rest stays."""
    cfg = model.cfg
    layers = model.model.layers
    sizes, fixed = split_blocks(model, layers)
    flops = text_encoder_layer_flops(tokens, batch, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                                     cfg.num_kv_heads, cfg.head_dim)  # fmt: skip
    act = activation_bytes
    if act is None:
        act = text_encoder_activation_bytes(tokens, batch, cfg.hidden_size, cfg.intermediate_size)
    return plan_blocks(sizes, fixed, free, reserve, act, flops / (card.tflops * 1e12 * card.mfu), card.h2d_gbps * GB,
                       name=f"{card.name}, text encoder {tokens} tokens", storage=storage_label(layers),
                       max_resident=max_resident)  # fmt: skip


# plan(free device bytes, or None when the caller's planner uses its own budget; max_resident or None)
Planner = Callable[[int | None, int | None], Plan]


def whole_model_planner(model: nn.Module, activation_bytes: int = 0, reserve: int = 0) -> Planner:
    """A planner placing all of a block-less model (the VAE) on the device."""
    _, fixed = split_blocks(model, [])

    def plan(free: int | None, max_resident: int | None = None) -> Plan:
        need = fixed + activation_bytes + reserve
        if free is not None and need > free:
            raise PlanError(f"{type(model).__name__}: {fixed / GB:.2f} GB of weights do not fit in {free / GB:.2f} GB")
        return plan_blocks([], fixed, need if free is None else free, reserve, activation_bytes, 0.0, 1.0,
                           type(model).__name__, storage_label(model))  # fmt: skip

    return plan


def slab_size(sizes: Sequence[int], cap: int = 4 << 30) -> int:
    """The power-of-two slab size that holds `sizes` (packed in order) in the fewest bytes.

    PyTorch's pinned (caching host) allocator rounds every allocation up to a power of two, so one
    allocation per block would waste up to half of it (a 340 MB fp8 block takes 512 MiB); packing
    blocks into power-of-two slabs wastes only the tail of each slab.
    """
    best, c = None, 1 << max(0, (max(sizes) - 1).bit_length())
    while best is None or c <= cap:
        slabs, used = 1, 0
        for n in sizes:
            slabs, used = (slabs + 1, n) if used + n > c else (slabs, used + n)
        if best is None or slabs * c < best[0]:
            best = (slabs * c, c)
        c *= 2
    return best[1]


def zero_overlap_step_s(plan: Plan, seconds_per_gb: float = 0.10) -> float:
    """Step time of an offloader without overlap (DisTorch's measured +0.10 s per GB on x16 Gen4, A4): it
    keeps as many weights as fit beside the activations (no staging ring) and pays for the rest in full."""
    weights = sum(plan.block_bytes) + plan.fixed_bytes
    offloaded = max(0, weights - (plan.free - plan.reserve - plan.activation_bytes))
    return plan.compute_s + seconds_per_gb * offloaded / GB
