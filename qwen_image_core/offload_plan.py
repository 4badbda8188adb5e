"""Offload planning: which blocks of a model stay on the GPU, which stream from host memory, and how fast.

A plan is made from numbers only (so it is deterministic and testable without a GPU): the free device
memory, a reserve, each block's bytes in its storage dtype (float8 = 1 byte per parameter, bf16 = 2), the
bytes of everything outside the blocks, an activation estimate, and a time model (compute per block from
FLOPs and the card's TFLOPS x MFU, copy per block from bytes and the pinned host-to-device bandwidth).

Streamed blocks are spread evenly among the resident ones, so each copy hides behind the compute of the
blocks before it (the aggregate condition "streamed bytes / bandwidth <= compute time" suffices rather
than the per-block one). `simulate` replays one step through the copy engine and the compute stream with
a ring of staging buffers, which is how the executor in `offload.py` orders them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

GB = 1e9
GiB = 1 << 30


ALIGN = 256  # bytes: the executor packs each tensor of a streamed block at this alignment


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers in their storage dtypes, each rounded up to ALIGN (as
    the executor packs them); works on the meta device too."""
    tensors = [*module.parameters(), *(b for b in module.buffers() if b is not None)]
    return sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in tensors)


def storage_label(module: nn.Module) -> str:
    """The storage dtype holding most of a module's bytes, as a short name (fp8, bf16, fp16, fp32)."""
    by_dtype: dict[torch.dtype, int] = {}
    for p in module.parameters():
        by_dtype[p.dtype] = by_dtype.get(p.dtype, 0) + p.numel() * p.element_size()
    if not by_dtype:
        return "-"
    dt = max(by_dtype, key=lambda d: (by_dtype[d], str(d)))
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dt, "fp8")


# ---------------------------------------------------------------------------------------------------------
# Hardware and workload
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Card:
    """A GPU for the time model. `tflops`: dense fp16/bf16 tensor peak with fp32 accumulate (the compute
    path here: float8 weights are upcast per layer, GEMMs run in bf16); `h2d_gbps`: effective pinned
    host-to-device bandwidth in GB/s; `mfu`: the fraction of peak the model reaches."""

    name: str
    vram: int  # total bytes
    tflops: float
    h2d_gbps: float
    mfu: float = 0.5  # anchors_performance §2: measured 38-52 % end to end; §4.4 plans at 50 %


# TFLOPS = SMs x boost clock x 512 FLOP/clock/SM (Ada/Ampere GeForce, fp16 with fp32 accumulate); this
# reproduces the anchors' 4090 165.2 and 4060 30.2. Bandwidth: 25 GB/s pinned on a x16 Gen4 link, 12.5 on x8.
CARDS = {
    "8GB": Card("RTX 4060 8 GB", 8 * GiB, 30.2, 12.5),
    "12GB": Card("RTX 4070 12 GB", 12 * GiB, 58.3, 25.0),
    "16GB": Card("RTX 4080 16 GB", 16 * GiB, 97.5, 25.0),
    "24GB": Card("RTX 4090 24 GB", 24 * GiB, 165.2, 25.0),
}

FLOP_PER_CLOCK_PER_SM = {8.0: 2048, 9.0: 4096}  # A100, H100 (dense bf16); GeForce parts: 512


def card_from_properties(name: str, total_memory: int, sms: int, clock_khz: int, capability: float,
                         h2d_gbps: float = 25.0) -> Card:  # fmt: skip
    """A Card for a detected GPU: TFLOPS = SMs x clock x FLOP/clock/SM (512 on GeForce Turing to Blackwell,
    which reproduces the 3090's 71 and the 4090's 165.2); the link defaults to pinned x16 Gen4."""
    per_sm = FLOP_PER_CLOCK_PER_SM.get(capability, 512)
    return Card(f"{name} {total_memory / GiB:.0f} GB", total_memory, sms * clock_khz * 1e3 * per_sm / 1e12, h2d_gbps)


def detect_card(device: torch.device | str = "cuda", h2d_gbps: float = 25.0) -> Card:
    """The Card of a CUDA device from its properties (the time model only; the memory comes from the driver)."""
    p = torch.cuda.get_device_properties(device)
    return card_from_properties(p.name, p.total_memory, p.multi_processor_count, p.clock_rate,
                                p.major + p.minor / 10, h2d_gbps)  # fmt: skip


@dataclass(frozen=True)
class DiTWorkload:
    """One denoising step: a batch of target images, optional edit references, CFG on or off."""

    width: int = 1328  # target pixels
    height: int = 1328
    batch: int = 1
    cfg: bool = True  # cond + uncond batched in one pass (each weight crosses the bus once per step)
    text_tokens: int = 256  # prompt tokens after the template is dropped
    references: tuple[tuple[int, int], ...] = ()  # (width, height) pixels of each edit reference
    compute_bytes: int = 2  # bytes per activation element (bf16 / fp16)
    fp16: bool = False  # float16 compute keeps the residual streams in float32

    @property
    def rows(self) -> int:
        return self.batch * (2 if self.cfg else 1)

    @property
    def image_tokens(self) -> int:
        sizes = ((self.width, self.height), *self.references)
        return sum(math.ceil(w / 16) * math.ceil(h / 16) for w, h in sizes)  # 8x VAE, 2x2 patches

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    def describe(self) -> str:
        refs = f" +{len(self.references)} ref" if self.references else ""
        return f"{self.width}x{self.height}{refs} {'CFG' if self.cfg else 'cfg 1'}"


# ---------------------------------------------------------------------------------------------------------
# FLOPs and activation memory
# ---------------------------------------------------------------------------------------------------------


def dit_block_flops(wl: DiTWorkload, hidden: int = 3072, mlp: int = 12288) -> float:
    """FLOPs of one DoubleStreamBlock for one step (anchors_performance §4.2).

    Each token passes its own stream's q, k, v, out (4 D^2) and MLP (2 D F) weights: 2 (4 D^2 + 2 D F)
    per token; joint attention is 4 N^2 D (QK^T and AV); AdaLN modulation 2 x 2 x 6 D^2 per row (tiny).
    Everything scales with the rows (batch x 2 with CFG).
    """
    n, d = wl.tokens, hidden
    linear = 2 * (4 * d * d + 2 * d * mlp) * n
    attention = 4 * n * n * d
    mod = 2 * 2 * 6 * d * d
    return wl.rows * (linear + attention + mod)


def dit_activation_bytes(wl: DiTWorkload, hidden: int = 3072, mlp: int = 12288) -> int:
    """Peak activation bytes of one DiT block (inference, no autograd); an upper estimate.

    rows = batch x (2 with CFG), N = image + reference + text tokens, e = compute bytes, s = residual
    bytes (4 in fp16, else e), D = hidden, F = MLP width.
      streams   = 2 rows N D s          the block's input and output residual streams
      attention = 10 rows N D e         modulated inputs, q k v, RoPE's float32 temporaries, output
      mlp       = rows N D e + 2 rows N_img F e   modulated input, up-projection and its GELU
      cast      = 6 D F                 the largest weight dequantised to float32 and cast to bf16
      peak      = streams + max(attention, mlp) + cast
    SDPA is assumed to be a flash / memory-efficient kernel (no rows x heads x N^2 score matrix).
    """
    e, s = wl.compute_bytes, 4 if wl.fp16 else wl.compute_bytes
    nd = wl.rows * wl.tokens * hidden
    attention = 10 * nd * e
    mlp_phase = nd * e + 2 * wl.rows * wl.image_tokens * mlp * e
    return 2 * nd * s + max(attention, mlp_phase) + 6 * hidden * mlp


def sampling_bytes(wl: DiTWorkload, hidden: int = 3072, mlp: int = 12288) -> int:
    """Working memory of a sampling run besides the weights: one block's activations plus the float32
    latents the sampler keeps (x, noise, the step's temporaries: about 6 copies)."""
    latents = wl.batch * 16 * (wl.height // 8) * (wl.width // 8) * 4 * 6
    return dit_activation_bytes(wl, hidden, mlp) + latents


def text_encoder_layer_flops(tokens: int, batch: int = 1, hidden: int = 3584, inter: int = 18944,
                             heads: int = 28, kv_heads: int = 4, head_dim: int = 128) -> float:  # fmt: skip
    """FLOPs of one Qwen2.5-VL decoder layer: q/o (2 x D x Hq hd), k/v (2 x D x Hkv hd), SwiGLU (3 D I),
    causal attention (2 L^2 Hq hd)."""
    weights = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter
    return batch * (2 * weights * tokens + 2 * tokens * tokens * heads * head_dim)


def text_encoder_activation_bytes(tokens: int, batch: int = 1, hidden: int = 3584, inter: int = 18944,
                                  compute_bytes: int = 2) -> int:  # fmt: skip
    """Peak activation bytes of one decoder layer: 8 B L D (residual, norm, q k v, RoPE temporaries,
    output) or B L (2 D + 3 I) in the MLP (gate, up, their product), whichever is larger, + a float32
    weight cast of the largest Linear."""
    bl = batch * tokens
    return max(8 * bl * hidden, bl * (2 * hidden + 3 * inter)) * compute_bytes + 6 * hidden * inter


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------


class PlanError(RuntimeError):
    """Not even the staging buffers and activations fit in the free memory."""


def interleave(n: int, streamed: int) -> tuple[int, ...]:
    """Indices of `streamed` of n blocks spread evenly: n - 1 - (k n) // S for k < S, so the last block
    streams and the first stays resident (its compute hides the first copy) unless all stream."""
    return tuple(sorted(n - 1 - k * n // streamed for k in range(streamed)))


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
    block_compute_s: float,
    h2d_bytes_per_s: float,
    name: str = "device",
    storage: str = "",
    max_resident: int | None = None,
    ring_sizes: Sequence[int] = (2, 3, 4),
) -> Plan:
    """The plan with the shortest simulated step that fits in `free - reserve - activation_bytes`.

    For each ring size k the most resident blocks that fit are kept (streamed ones interleaved); among
    those candidates the fastest wins, ties going to more resident blocks, then the smaller ring.
    `max_resident` caps the resident count (out-of-memory recovery). Deterministic.
    """
    n = len(block_bytes)
    budget = free - reserve - activation_bytes - fixed_bytes  # for blocks and staging
    cap = n if max_resident is None else max(0, min(n, max_resident))
    compute = [block_compute_s] * n
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


def split_blocks(model: nn.Module, blocks: Sequence[nn.Module]) -> tuple[list[int], int]:
    """(bytes of each block, bytes of the rest of the model)."""
    sizes = [tensor_bytes(b) for b in blocks]
    return sizes, tensor_bytes(model) - sum(sizes)


def plan_dit(model: nn.Module, free: int, card: Card, workload: DiTWorkload = DiTWorkload(), reserve: int = GiB,
             max_resident: int | None = None, activation_bytes: int | None = None) -> Plan:  # fmt: skip
    """Plan an MMDiT (its `transformer_blocks`) for a workload on a card with `free` device bytes.

    activation_bytes: what to keep free for activations (None: the workload's estimate; 0 when the caller's
    budget already excludes them, as ComfyUI's does)."""
    cfg = model.config
    sizes, fixed = split_blocks(model, model.transformer_blocks)
    flops = dit_block_flops(workload, cfg.hidden, cfg.mlp_dim)
    if activation_bytes is None:
        activation_bytes = dit_activation_bytes(workload, cfg.hidden, cfg.mlp_dim)
    return plan_blocks(
        sizes, fixed, free, reserve, activation_bytes,
        flops / (card.tflops * 1e12 * card.mfu), card.h2d_gbps * GB,
        name=f"{card.name}, {workload.describe()}", storage=storage_label(model.transformer_blocks),
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
