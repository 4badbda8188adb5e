"""ControlNets planned and streamed with the DiT by the same offload executor (offload.py, offload_plan.py).

A step with ControlNets runs each ControlNet's blocks (on the positive prompt) and then the DiT's blocks. One plan
covers all of them in that order: the planner chooses the resident blocks among the ControlNets' and the DiT's
together (each block's compute from its own workload: a ControlNet computes the positive rows only), and one
staging ring streams the others, so the copies of the DiT's first streamed blocks run while the ControlNet's last
blocks compute. Everything outside the blocks (input and output layers, `controlnet_blocks` projections, the
embedders) stays resident. A step whose ControlNets are all inactive (outside their start/end fraction) skips
their blocks and streams the DiT's alone.

    plan = plan_controlled(dit, [net], free, card, DiTWorkload(1328, 1328))
    print(plan.explain())
    with controlled_streamer(dit, [net], plan, transfer):
        latents = pipeline.sample(dit, noise, cond, uncond, sigmas=sigmas, controls=[Control(net, latent)])

Inside ComfyUI a ControlNet is its own model for ComfyUI's model management (nodes/controlnet.py): ComfyUI gives
it a budget beside the DiT's, and `plan_controlnet` places it within that budget with the same executor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import nn

from .controlnet import InstantXControlNet
from .modulation import modulation_layers
from .offload import BlockStreamer, HostCopies, Transfer
from .offload_plan import (
    GB,
    Card,
    DiTWorkload,
    GiB,
    Plan,
    dit_activation_bytes,
    dit_block_flops,
    plan_blocks,
    plan_dit,
    split_blocks,
    storage_label,
)

UNBOUNDED = 1 << 62  # bytes: a budget that keeps every block resident (to read a model's sizes and compute)


@dataclass(frozen=True)
class Part:
    """One model's run of blocks in a joint plan."""

    name: str  # e.g. "union ControlNet", "DiT"
    first: int  # index of its first block among the plan's blocks
    count: int  # its blocks
    storage: str  # what its blocks are stored in (fp8, bf16, ...)


@dataclass(frozen=True)
class ControlledPlan:
    """A `Plan` over the ControlNets' blocks followed by the DiT's, and which blocks belong to which model."""

    plan: Plan
    parts: tuple[Part, ...]  # in execution order: the ControlNets, then the DiT

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    def streamed(self, part: Part) -> tuple[int, ...]:
        """The part's streamed blocks, as indices into its own blocks."""
        return tuple(i - part.first for i in self.plan.streamed if part.first <= i < part.first + part.count)

    def resident(self, part: Part) -> tuple[int, ...]:
        s = set(self.streamed(part))
        return tuple(i for i in range(part.count) if i not in s)

    def streamed_bytes(self, part: Part) -> int:
        """Bytes the part's streamed blocks move per step (when the part runs that step)."""
        return sum(self.plan.block_bytes[part.first + i] for i in self.streamed(part))

    def resident_bytes(self, part: Part) -> int:
        return sum(self.plan.block_bytes[part.first + i] for i in self.resident(part))

    def explain(self) -> str:
        lines = [self.plan.explain()]
        for p in self.parts:
            s = self.streamed(p)
            text = f"  {p.name}: {p.count - len(s)}/{p.count} blocks resident ({_size(self.resident_bytes(p))}"
            text += f" {p.storage})"
            if s:
                text += f", {len(s)} streamed ({_size(self.streamed_bytes(p))} per step: blocks {list(s)})"
            lines.append(text)
        return "\n".join(lines)


def _size(nbytes: int) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.2f} MB"


def residual_bytes(nets: Sequence[InstantXControlNet], workload: DiTWorkload) -> int:
    """Bytes of the ControlNets' residuals, held from their run until the DiT's last block: one [batch, target
    tokens, hidden] tensor per ControlNet block, in the residual streams' dtype (float32 when computing in fp16)."""
    w, h = workload.width, workload.height
    tokens = -(-w // 16) * -(-h // 16)
    element = 4 if workload.fp16 else workload.compute_bytes
    return sum(n.config.num_layers * workload.batch * tokens * n.config.hidden * element for n in nets)


def _part_plans(dit: nn.Module, nets: Sequence[InstantXControlNet], card: Card, workload: DiTWorkload,
                modulation: bool, steps: int) -> list[tuple[str, Plan]]:  # fmt: skip
    """Each model's all-resident plan (its block bytes, fixed bytes, compute and activations), in run order."""
    net_workload = replace(workload, cfg=False, references=())  # positive rows only, no edit references
    names = [f"{n.kind} ControlNet" + (f" {i + 1}" if len(nets) > 1 else "") for i, n in enumerate(nets)]
    out = [(name, plan_dit(n, UNBOUNDED, card, net_workload, 0)) for name, n in zip(names, nets, strict=True)]
    return out + [("DiT", plan_dit(dit, UNBOUNDED, card, workload, 0, modulation=modulation, steps=steps))]


def plan_controlled(dit: nn.Module, nets: Sequence[InstantXControlNet], free: int, card: Card,
                    workload: DiTWorkload | None = None, reserve: int = GiB, max_resident: int | None = None,
                    activation_bytes: int | None = None, modulation: bool = False,
                    steps: int = 20) -> ControlledPlan:  # fmt: skip
    """One plan for the ControlNets' blocks and the DiT's on a card with `free` device bytes.

    activation_bytes: kept free for activations (None: the larger of the models' estimates plus the residuals
    held across the DiT's pass). modulation: as `plan_dit` (the DiT's modulation precomputed; its layers stay on
    the host: stream with `controlled_streamer(modulation=True)`)."""
    workload = workload or DiTWorkload()
    parts = _part_plans(dit, nets, card, workload, modulation, steps)
    sizes, compute, out, first = [], [], [], 0
    for (name, p), model in zip(parts, [*nets, dit], strict=True):
        sizes += p.block_bytes
        compute += [p.compute_s / max(1, p.num_blocks)] * p.num_blocks
        out.append(Part(name, first, p.num_blocks, storage_label(model.transformer_blocks)))
        first += p.num_blocks
    if activation_bytes is None:
        activation_bytes = max(p.activation_bytes for _, p in parts) + residual_bytes(nets, workload)
    label = " + ".join(p.name for p in out[:-1])
    plan = plan_blocks(
        sizes, sum(p.fixed_bytes for _, p in parts), free, reserve, activation_bytes, compute, card.h2d_gbps * GB,
        name=f"{card.name}, {workload.describe()}" + (f" with {label}" if label else ""),
        storage=out[-1].storage, max_resident=max_resident,
    )  # fmt: skip
    return ControlledPlan(plan, tuple(out))


def plan_controlnet(net: InstantXControlNet, free: int, card: Card, workload: DiTWorkload | None = None,
                    reserve: int = GiB, max_resident: int | None = None,
                    activation_bytes: int | None = None) -> Plan:  # fmt: skip
    """A ControlNet alone (its blocks; the rest resident), for a host that budgets it apart from the DiT
    (ComfyUI's model management: nodes/controlnet.py). Its workload is the positive rows only."""
    wl = replace(workload or DiTWorkload(), cfg=False, references=())
    plan = plan_dit(net, free, card, wl, reserve, max_resident, activation_bytes)
    return replace(plan, name=f"{card.name}, {wl.describe()}, {net.kind} ControlNet")


def plan_fun_controlnet(net: nn.Module, free: int, card: Card, workload: DiTWorkload | None = None,
                        reserve: int = GiB, max_resident: int | None = None,
                        activation_bytes: int | None = None) -> Plan:  # fmt: skip
    """The Fun ControlNet Union (`controlnet_fun.FunControlNet`) alone: its `control_blocks` planned, the rest
    (control_img_in) resident; the branch runs every row of the batch, as the DiT."""
    wl, cfg = replace(workload or DiTWorkload(), references=()), net.config
    sizes, fixed = split_blocks(net, net.control_blocks)
    if activation_bytes is None:
        activation_bytes = dit_activation_bytes(wl, cfg.hidden, cfg.mlp_dim)
    return plan_blocks(
        sizes, fixed, free, reserve, activation_bytes,
        dit_block_flops(wl, cfg.hidden, cfg.mlp_dim) / (card.tflops * 1e12 * card.mfu), card.h2d_gbps * GB,
        name=f"{card.name}, {wl.describe()}, Fun ControlNet", storage=storage_label(net.control_blocks),
        max_resident=max_resident,
    )  # fmt: skip


def joint_blocks(dit: nn.Module, nets: Sequence[InstantXControlNet]) -> list[nn.Module]:
    """The blocks in the order a step runs them: each ControlNet's, then the DiT's."""
    return [b for m in [*nets, dit] for b in m.transformer_blocks]


def controlled_streamer(dit: nn.Module, nets: Sequence[InstantXControlNet], plan: ControlledPlan,
                        transfer: Transfer, host: HostCopies | None = None,
                        modulation: bool = False) -> BlockStreamer:  # fmt: skip
    """The executor running `plan` on the DiT and its ControlNets (a context manager, or attach / detach).

    Its pass starts with the first ControlNet's forward (the prefetch of the first streamed blocks); a step
    without that ControlNet resynchronises at the first block that runs. `stats.bytes_moved` counts every
    streaming copy. modulation=True leaves the DiT's modulation layers on the host (plan made with it)."""
    planned, have = [p.count for p in plan.parts], [len(m.transformer_blocks) for m in [*nets, dit]]
    if planned != have:
        raise ValueError(f"the plan is for blocks {planned}; the models have {have}")
    holder = nn.ModuleList([*nets, dit])  # the models' tensors as one tree (holds references, runs nothing)
    skip = [m for _, m in modulation_layers(dit)] if modulation else []
    root = nets[0] if nets else dit
    return BlockStreamer(holder, joint_blocks(dit, nets), plan.plan, transfer, root=root, host=host, skip=skip)
