"""Offload planning for the Qwen-Image-2.1 DiT: its 32 blocks stream as v1's do (the shared `offload_plan`
planner and `offload.BlockStreamer` executor), with the prefix K/V cache counted as device memory.

A run computes the prefix (text + references) once (`prefill`), keeps its keys and values on the device
(`attention.cache_bytes`: 2 x blocks x prefix tokens x hidden per condition, a second set with CFG), and
then runs the target's tokens only at every step. The plan therefore holds: the non-block weights, the cache,
the resident blocks, the staging ring, and the activations of the larger of the two passes (the prefill over
the prefix, a step over the target attending to prefix + target keys). Its time model is a cached step.
With `cache_on_host` the cache stays in (pinned) host memory and only one block's keys and values are on the
device at a time, their copy counted in line with the block's compute.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..costs import GB, Card, GiB
from ..offload_plan import Plan, PlanError, plan_blocks, split_blocks, storage_label
from .attention import cache_bytes
from .schedule import VAE_SCALE, target_tokens


@dataclass(frozen=True)
class Workload21:
    """One run of the 2.1 DiT: a batch of targets, references, CFG on or off (the official default is off)."""

    width: int = 2048  # target pixels (native 2K)
    height: int = 2048
    batch: int = 1
    cfg: bool = False  # a negative prompt: a second condition (and cache) and twice the rows
    text_tokens: int = 512  # condition tokens besides the references' image slots
    references: tuple[tuple[int, int], ...] = ()  # (width, height) pixels of each reference
    compute_bytes: int = 2  # bytes per activation element (bf16)
    cache_on_host: bool = False  # the prefix cache in host memory, one block's keys and values copied in at a time

    @property
    def rows(self) -> int:
        return self.batch * (2 if self.cfg else 1)

    @property
    def conditions(self) -> int:
        return 2 if self.cfg else 1  # one prefix per condition, shared by the batch

    @property
    def target(self) -> int:
        return target_tokens(self.height, self.width)

    @property
    def prefix(self) -> int:
        refs = sum((h // VAE_SCALE) * (w // VAE_SCALE) for w, h in self.references)
        return self.text_tokens + refs

    def describe(self) -> str:
        refs = f" +{len(self.references)} ref" if self.references else ""
        host = ", cache on host" if self.cache_on_host else ""
        return f"2.1 {self.width}x{self.height}{refs} {'CFG' if self.cfg else 'cfg 1'}{host}"


def block_flops(wl: Workload21, hidden: int, mlp: int) -> float:
    """FLOPs of one block for a cached step: the target's tokens through q, k, v, out (4 D^2) and the SwiGLU
    (3 D F), attention of N target queries over P + N keys (4 N (P + N) D), per row."""
    n, p = wl.target, wl.prefix
    return wl.rows * (2 * (4 * hidden * hidden + 3 * hidden * mlp) * n + 4 * n * (p + n) * hidden)


def activation_bytes(wl: Workload21, hidden: int, mlp: int) -> int:
    """Peak activation bytes of one block, the larger of the prefill (prefix rows per condition) and a step
    (target rows, keys over prefix + target): streams 2 T D, attention inputs and outputs ~10 T D (+ the
    concatenated keys and values 2 K D), the SwiGLU's gate_up and product 3 T F; + one weight cast to float32."""
    e = wl.compute_bytes

    def peak(tokens: int, keys: int, rows: int) -> int:
        td = rows * tokens * hidden
        return (2 * td + max(10 * td + 2 * rows * keys * hidden, td + 3 * rows * tokens * mlp)) * e

    prefill = peak(wl.prefix, wl.prefix, wl.conditions)
    step = peak(wl.target, wl.prefix + wl.target, wl.rows)
    return max(prefill, step) + 4 * 2 * hidden * mlp  # the largest layer (gate_up) dequantised to float32


def prefix_cache_bytes(model: nn.Module, wl: Workload21) -> int:
    cfg = model.config
    return cache_bytes(cfg.num_layers, cfg.hidden, wl.prefix, wl.conditions, wl.compute_bytes)


def plan_dit21(model: nn.Module, free: int, card: Card, workload: Workload21 | None = None, reserve: int = GiB,
               max_resident: int | None = None, activation: int | None = None) -> Plan:  # fmt: skip
    """Plan a 2.1 DiT (its `transformer_blocks`) for a run on a card with `free` device bytes; the prefix cache
    stays on the device with the non-block weights. activation: bytes kept for activations (None: the
    workload's estimate; 0 when the caller's budget already excludes them)."""
    cfg, wl = model.config, workload or Workload21()
    sizes, fixed = split_blocks(model, model.transformer_blocks)
    act = activation_bytes(wl, cfg.hidden, cfg.mlp_dim) if activation is None else activation
    cache = prefix_cache_bytes(model, wl)
    block_s = block_flops(wl, cfg.hidden, cfg.mlp_dim) / (card.tflops * 1e12 * card.mfu)
    if wl.cache_on_host:  # one block's pair on the device at a time, its copy in line with the compute
        cache //= cfg.num_layers
        block_s += cache / (card.h2d_gbps * GB)
    try:
        return plan_blocks(
            sizes, fixed + cache, free, reserve, act, block_s, card.h2d_gbps * GB,
            name=f"{card.name}, {wl.describe()}", storage=storage_label(model.transformer_blocks),
            max_resident=max_resident,
        )  # fmt: skip
    except PlanError as e:
        raise PlanError(
            f"{e}; the non-block bytes include the prefix K/V cache on the device, {cache / GB:.2f} GB"
            + ("" if wl.cache_on_host else " (cache_on_host keeps it in host memory)")
        ) from None
