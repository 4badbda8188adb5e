"""Placement across several devices in one process: which contiguous range of a model's blocks each device
holds, what of its range stays resident and what streams, and the estimated step time.

Every device gets its own budget and its own single-device plan (`offload_plan.plan_blocks`) over its range,
so streaming on each device uses the same ring of staging buffers as on one device. The head of the model
(everything before the blocks: embedders, input projections) lives on the first device, the tail (final norm
and output projection) on the last one used; the activations (residual streams, timestep embedding,
modulation, rotary table, text mask) cross to the next device at each range boundary. Devices compute one
after another (a pipeline of one request, not model parallelism), so the step time is the sum of the
devices' simulated steps plus the boundary copies.

How the blocks are spread (deterministic):
- if everything fits resident on the first k devices of the list, the smallest such k is used, each device
  filled in order as far as its budget allows (fewest boundaries; later devices stay free);
- otherwise two spreads are costed and the faster kept (ties: more blocks resident): (1) each device takes, in
  order, the blocks its budget holds resident beside a staging ring of two, plus a share of the blocks that
  must stream, proportional to its resident count + 1 (the resident blocks' compute hides the copies);
  (2) the devices before the last hold blocks resident only, the last streams the rest. Each device's own
  plan then streams what its range does not hold. A device that cannot
  hold even the ring is left out (the plan says so); if none can, `PlanError` names each device's need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .costs import GB, Card, DiTWorkload, GiB, dit_activation_bytes, dit_block_flops
from .offload_plan import Plan, PlanError, plan_blocks, split_blocks, storage_label, tensor_bytes


@dataclass(frozen=True)
class DeviceBudget:
    """One device the model may use: its name (as torch spells it, or a test label), the bytes this model may
    hold there, and its time model (TFLOPS, host link) for the estimate."""

    name: str  # e.g. "cuda:1"
    free: int  # bytes for this model on the device (weights, staging, activations, reserve)
    card: Card


@dataclass(frozen=True)
class Stage:
    """One device's share: blocks [first, first + plan.num_blocks) under its own single-device plan."""

    device: str
    first: int  # global index of the stage's first block
    plan: Plan  # over the stage's blocks only; its fixed_bytes are the head and/or tail placed here
    head: bool  # the model's head (embedders, input projections) is on this device
    tail: bool  # the model's tail (final norm, output projection) is on this device

    @property
    def blocks(self) -> range:
        return range(self.first, self.first + self.plan.num_blocks)


@dataclass(frozen=True)
class MultiPlan:
    """Stages in execution order (one per device used) and the estimate of one step over all of them."""

    name: str
    stages: tuple[Stage, ...]
    unused: tuple[str, ...]  # listed devices left out, each with the reason
    boundary_bytes: int  # activation bytes crossing one range boundary per pass (estimate)
    link_gbps: float  # device-to-device bandwidth (GB/s) the estimate assumes
    compute_s: float  # per step, all blocks
    step_s: float  # per step: every stage's simulated step + the boundary copies

    @property
    def num_blocks(self) -> int:
        return sum(s.plan.num_blocks for s in self.stages)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(s.device for s in self.stages)

    @property
    def boundary_s(self) -> float:
        return (len(self.stages) - 1) * self.boundary_bytes / (self.link_gbps * GB)

    def explain(self) -> str:
        est = f"{self.step_s:.2f} s/step ({self.compute_s:.2f} compute, {self.boundary_s:.3f} boundary copies)"
        lines = [f"{self.name}: {self.num_blocks} blocks over {len(self.stages)} device(s), est. {est}"]
        for s in self.stages:
            p, r = s.plan, s.blocks
            parts = [f"blocks {r.start}-{r.stop - 1}", f"{len(p.resident)} resident ({_size(p.resident_bytes)})"]
            if p.streamed:
                parts.append(f"{len(p.streamed)} streamed ({_size(p.streamed_bytes)}/step via {p.buffers} buffers)")
            extra = [w for w, on in (("head", s.head), ("tail", s.tail)) if on]
            if extra:
                parts.append(f"{' + '.join(extra)} {_size(p.fixed_bytes)}")
            parts.append(f"{_size(p.device_bytes)} held of {_size(p.free)}")
            lines.append(f"  {s.device}: " + ", ".join(parts))
        lines += [f"  {u}" for u in self.unused]
        return "\n".join(lines)


def _size(nbytes: int) -> str:
    """Bytes as GB (MB below 0.1 GB, kB below 0.1 MB: tiny test models stay readable)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale / 10:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 1e3:.1f} kB"


def _stage_budget(d: DeviceBudget, reserve: int, activation_bytes: int, fixed: int) -> int:
    return d.free - reserve - activation_bytes - fixed


def _resident_split(sizes, head, tail, devices, reserve, act, fill: bool = False) -> list[int] | None:
    """Block counts per device when everything fits resident on a prefix of the devices (fewest devices).
    fill=True: the counts of all the devices, each filled in order as far as it holds (some blocks may be left)."""
    n = len(sizes)
    if fill:
        counts, at = [], 0
        for j, d in enumerate(devices):
            room, take = _stage_budget(d, reserve, act, head if j == 0 else 0), 0
            while at + take < n and sum(sizes[at : at + take + 1]) <= room:
                take += 1
            counts.append(take)
            at += take
        return counts
    for k in range(1, len(devices) + 1):
        counts, at = [], 0
        for j in range(k):
            fixed = (head if j == 0 else 0) + (tail if j == k - 1 else 0)
            room, take = _stage_budget(devices[j], reserve, act, fixed), 0
            if room < 0:
                break
            while at + take < n and sum(sizes[at : at + take + 1]) <= room:
                take += 1
            counts.append(take)
            at += take
        if len(counts) == k and at == n:
            return counts
    return None


def _streaming_split(sizes: Sequence[int], rooms: Sequence[int]) -> list[int]:
    """Contiguous block counts when streaming: device j takes the blocks its room holds resident (in order) plus
    a share of the streamed ones proportional to its resident count + 1 (resident compute hides the copies)."""
    n, at, resident = len(sizes), 0, []
    for room in rooms:
        take = 0
        while at + take < n and sum(sizes[at : at + take + 1]) <= room:
            take += 1
        resident.append(take)
        at += take
    streamed, weights = n - at, [c + 1 for c in resident]
    edges = [round(streamed * sum(weights[: j + 1]) / sum(weights)) for j in range(len(rooms))]
    shares = [e - p for e, p in zip(edges, [0, *edges[:-1]], strict=True)]
    return [c + s for c, s in zip(resident, shares, strict=True)]


def plan_devices(
    block_bytes: Sequence[int],
    head_bytes: int,
    tail_bytes: int,
    devices: Sequence[DeviceBudget],
    block_flops: float,
    activation_bytes: int,
    boundary_bytes: int,
    reserve: int = GiB,
    link_gbps: float = 12.5,
    name: str = "model",
    storage: str = "",
    counts: Sequence[int] | None = None,
) -> MultiPlan:
    """Spread `block_bytes` (in execution order) over `devices` (in the order given; the first holds the head).

    block_flops: one block's FLOPs per step (each device's card turns it into seconds); activation_bytes: kept
    free on every device; boundary_bytes: what crosses a boundary per pass; link_gbps: device to device; counts:
    blocks per device in order (None: chosen as the module says), each device's plan then made for its range."""
    names = [d.name for d in devices]
    if not devices:
        raise ValueError("plan_devices: no devices given")
    if len(set(names)) != len(names):
        raise ValueError(f"plan_devices: a device is listed twice in {', '.join(names)}")
    unused: list[str] = []

    def build(used: Sequence[DeviceBudget], counts: Sequence[int]) -> MultiPlan:
        stages, at = [], 0
        for j, (d, c) in enumerate(zip(used, counts, strict=True)):
            head, tail = j == 0, j == len(used) - 1
            fixed = (head_bytes if head else 0) + (tail_bytes if tail else 0)
            sec = block_flops / (d.card.tflops * 1e12 * d.card.mfu)
            try:
                plan = plan_blocks(block_bytes[at : at + c], fixed, d.free, reserve, activation_bytes, sec,
                                   d.card.h2d_gbps * GB, name=d.name, storage=storage)  # fmt: skip
            except PlanError as e:
                raise PlanError(f"{name}: {e}") from None
            stages.append(Stage(d.name, at, plan, head, tail))
            at += c
        compute = sum(s.plan.compute_s for s in stages)
        steps = sum(s.plan.step_s for s in stages) + (len(stages) - 1) * boundary_bytes / (link_gbps * GB)
        left = [u for u in unused if u.split(":")[0] not in {d.name for d in used}]
        return MultiPlan(name, tuple(stages), tuple(left), boundary_bytes, link_gbps, compute, steps)

    if counts is not None:  # the caller's ranges
        if len(counts) != len(devices) or sum(counts) != len(block_bytes) or min(counts) < 0:
            raise ValueError(f"plan_devices: counts {list(counts)} do not split {len(block_bytes)} blocks over "
                             f"{len(devices)} devices")  # fmt: skip
        unused += [f"{d.name}: not used (0 blocks asked)" for d, c in zip(devices, counts, strict=True) if not c]
        return build([d for d, c in zip(devices, counts, strict=True) if c], [c for c in counts if c])
    counts = _resident_split(block_bytes, head_bytes, tail_bytes, devices, reserve, activation_bytes)
    if counts is not None:
        unused += [f"{d.name}: not needed (everything fits on the devices before it)" for d in devices[len(counts) :]]
        return build(devices[: len(counts)], counts)
    # streaming. Candidate 1: every device that can hold a staging ring keeps what it can resident beside it and
    # streams a share; candidate 2: the devices before the last hold blocks resident only, the last streams the
    # rest. The faster by the time model wins (ties: more blocks resident).
    ring = 2 * max(block_bytes, default=0)
    rooms = []
    for j, d in enumerate(devices):
        fixed = (head_bytes if j == 0 else 0) + (tail_bytes if j == len(devices) - 1 else 0)
        rooms.append(_stage_budget(d, reserve, activation_bytes, fixed) - ring)
    keep = [j for j, r in enumerate(rooms) if r >= 0]
    for j, d in enumerate(devices):
        if j not in keep:
            unused.append(f"{d.name}: not used, {_size(d.free)} cannot hold its staging ring "
                          f"({_size(ring)}) beside {_size(activation_bytes)} activations and "
                          f"{_size(reserve)} reserve")  # fmt: skip
    if not keep:
        raise PlanError(f"{name}: no device can stream this model:\n" + "\n".join(unused))
    candidates, errors = [], []
    shared = _streaming_split(block_bytes, [rooms[j] for j in keep])
    last = keep[-1]
    filled = _resident_split(block_bytes[:-1], head_bytes, 0, devices[:last], reserve, activation_bytes, fill=True)
    for used, counts in (([devices[j] for j in keep], shared), ([*devices[:last], devices[last]], [*filled, 0])):
        counts = list(counts)
        counts[-1] += len(block_bytes) - sum(counts)
        pairs = [(d, c) for d, c in zip(used, counts, strict=True) if c]
        try:
            candidates.append(build([d for d, _ in pairs], [c for _, c in pairs]))
        except PlanError as e:
            errors.append(e)
    if not candidates:
        raise errors[0]
    best = min(candidates, key=lambda p: (round(p.step_s, 9), -sum(len(s.plan.resident) for s in p.stages)))
    names_used = set(best.devices)
    extra = [f"{d.name}: not needed (no blocks left for it)" for d in devices
             if d.name not in names_used and not any(u.startswith(d.name + ":") for u in best.unused)]  # fmt: skip
    return MultiPlan(best.name, best.stages, (*best.unused, *extra), best.boundary_bytes, best.link_gbps,
                     best.compute_s, best.step_s)  # fmt: skip


def dit_parts(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
    """(head modules, blocks, tail modules) of an MMDiT; a clear error if they do not cover all its tensors."""
    head = [model.img_in, model.txt_norm, model.txt_in, model.time_text_embed]
    blocks, tail = list(model.transformer_blocks), [model.norm_out, model.proj_out]
    covered = sum(tensor_bytes(m) for m in (*head, *blocks, *tail))
    if covered != tensor_bytes(model):
        raise ValueError(f"{type(model).__name__}: its head, blocks and tail do not hold all its weights "
                         f"({covered} of {tensor_bytes(model)} bytes); it cannot be spread over devices")  # fmt: skip
    return head, blocks, tail


def plan_dit_devices(model: nn.Module, devices: Sequence[DeviceBudget], workload: DiTWorkload | None = None,
                     reserve: int = GiB, activation_bytes: int | None = None,
                     link_gbps: float = 12.5, counts: Sequence[int] | None = None) -> MultiPlan:  # fmt: skip
    """Plan an MMDiT over `devices` for a workload (activation_bytes None: the workload's estimate per device;
    0 when each budget already leaves room for them; counts: blocks per device, see `plan_devices`)."""
    cfg, wl = model.config, workload or DiTWorkload()
    head, blocks, tail = dit_parts(model)
    sizes, _ = split_blocks(model, blocks)
    act = dit_activation_bytes(wl, cfg.hidden, cfg.mlp_dim) if activation_bytes is None else activation_bytes
    # residual streams (img and txt) in the stream dtype, temb, and the float32 rotary table [N, hd/2, 2, 2]
    s = 4 if wl.fp16 else wl.compute_bytes
    boundary = wl.rows * wl.tokens * cfg.hidden * s + 2 * wl.rows * cfg.hidden * s + wl.tokens * sum(cfg.rope_axes) * 8
    return plan_devices(sizes, sum(tensor_bytes(m) for m in head), sum(tensor_bytes(m) for m in tail), devices,
                        dit_block_flops(wl, cfg.hidden, cfg.mlp_dim), act, boundary, reserve, link_gbps,
                        name=f"{wl.describe()} over {', '.join(d.name for d in devices)}",
                        storage=storage_label(model.transformer_blocks), counts=counts)  # fmt: skip
