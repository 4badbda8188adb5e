"""The executor of a multi-device plan (`multi_device_plan.py`): one `BlockStreamer` per device over its range
of blocks (resident blocks placed once, the rest streamed through that device's own staging ring, with that
device's `Transfer`), and the activations moved between devices at range boundaries.

Moves. Before a block of stage j (j > 0) runs, every tensor argument not yet on stage j (the residual streams
coming from stage j - 1; the timestep embedding, rotary table, text mask and precomputed modulation the model
computed on the first device) is copied there with `Transfer.activation`, once per pass (copies of the
same tensor are reused by the later blocks of the stage). The tail (final norm, output projection) runs on
the last stage with its inputs moved the same way, and the model's output is moved back to the first device,
so a caller only ever sees the first device (ComfyUI's main device). On CUDA a tensor already on the stage's
device is left alone; on the CPU stand-ins of the tests (every stage on the host, each with its own
accounting `Transfer`), a tensor counts as on stage j when it is the output of stage j's previous block or
module (or a view of it). LoRA factors (`ops.Linear.lora`) are moved to the device of their layer's stage
on first use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .costs import GiB
from .multi_device_plan import DeviceBudget, MultiPlan, Stage, dit_parts, plan_dit_devices
from .offload import BlockStreamer, Transfer, default_transfer


class _Boundary:
    """The activations of one pass on one stage: what it produced last, and what was copied to it."""

    def __init__(self, transfer: Transfer):
        self.transfer = transfer
        self.produced: tuple[int, ...] = ()  # ids of the outputs of the stage's last block / module
        self.moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(source) -> (source, its copy here)
        self.bytes = 0  # activation bytes copied to this stage so far

    def here(self, t: torch.Tensor) -> bool:
        dev = self.transfer.device
        if dev.type != "cpu":
            return t.device == dev
        return id(t) in self.produced or (t._base is not None and id(t._base) in self.produced)

    def bring(self, x):
        """x (a tensor, or a tuple / list of them, else as is) with every tensor on this stage."""
        if isinstance(x, torch.Tensor):
            if self.here(x):
                return x
            held = self.moved.get(id(x))
            if held is None:
                held = (x, self.transfer.activation(x))
                self.moved[id(x)] = held
                self.bytes += x.numel() * x.element_size()
            return held[1]
        if isinstance(x, (tuple, list)):
            return type(x)(self.bring(v) for v in x)
        return x

    def made(self, out) -> None:
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.produced = tuple(id(t) for t in outs if isinstance(t, torch.Tensor))

    def reset(self) -> None:
        self.produced, self.moved = (), {}


class MultiDeviceStreamer:
    """Runs a `MultiPlan` on `model`: `head` modules on the first stage, `blocks` split into the plan's ranges,
    `tail` modules on the last stage; `transfers` in the plan's stage order (one per device used). Use as a
    context manager, or `attach()` / `detach()` (which restores the host tensors, as `BlockStreamer`)."""

    def __init__(self, model: nn.Module, head: Sequence[nn.Module], blocks: Sequence[nn.Module],
                 tail: Sequence[nn.Module], plan: MultiPlan, transfers: Sequence[Transfer]):  # fmt: skip
        if plan.num_blocks != len(blocks):
            raise ValueError(f"the plan is for {plan.num_blocks} blocks, the model has {len(blocks)}")
        if len(transfers) != len(plan.stages):
            raise ValueError(f"{len(transfers)} transfers for a plan over {len(plan.stages)} devices")
        self.model, self.plan, self.transfers = model, plan, list(transfers)
        self.blocks, self.head, self.tail = list(blocks), list(head), list(tail)
        self.streamers: list[BlockStreamer] = []
        for j, (s, t) in enumerate(zip(plan.stages, transfers, strict=True)):
            parts = nn.ModuleList([*(self.head if s.head else ()), *self.blocks[s.blocks.start : s.blocks.stop],
                                   *(self.tail if s.tail else ())])  # fmt: skip
            self.streamers.append(
                BlockStreamer(parts, self.blocks[s.blocks.start : s.blocks.stop], s.plan, t, root=model)
            )
            if s.head != (j == 0) or s.tail != (j == len(plan.stages) - 1):
                raise ValueError("the head must be on the first stage and the tail on the last")
        self.boundaries = [_Boundary(t) for t in transfers]
        self._hooks: list = []

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self.plan.stages

    @property
    def device(self) -> torch.device:
        """Where the model takes its inputs and gives its output: the first stage's device."""
        return self.transfers[0].device

    def moved_bytes(self) -> list[int]:
        """Activation bytes copied to each stage so far (the first: the outputs brought back)."""
        return [b.bytes for b in self.boundaries]

    def attach(self) -> MultiDeviceStreamer:
        if self._hooks:
            return self
        done: list[BlockStreamer] = []
        try:
            for s in self.streamers:
                done.append(s.attach())
        except BaseException:
            for s in done:
                s.detach()
            raise
        self._hooks.append(self.model.register_forward_pre_hook(self._pre_root))
        if len(self.stages) > 1:
            self._hooks.append(self.model.register_forward_hook(self._post_root))
            for j, s in enumerate(self.stages[1:], start=1):
                for m in [*self.blocks[s.blocks.start : s.blocks.stop], *(self.tail if s.tail else ())]:
                    self._hooks.append(m.register_forward_pre_hook(self._bring(j), with_kwargs=True))
                    self._hooks.append(m.register_forward_hook(self._made(j)))
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for s in reversed(self.streamers):
            s.detach()
        for b in self.boundaries:
            b.reset()

    def __enter__(self) -> MultiDeviceStreamer:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _pre_root(self, module, args) -> None:
        for b in self.boundaries:  # copies of the last pass are not reused (new timestep, new inputs)
            b.reset()

    def _post_root(self, module, args, output):
        result = self.boundaries[0].bring(output)  # computed on the last stage
        for b in self.boundaries:
            b.reset()
        return result

    def _bring(self, j: int):
        def hook(module, args, kwargs):
            b = self.boundaries[j]
            if b.transfer.device.type != "cpu":
                factors_to(module, b.transfer.device)
            return b.bring(args), {k: b.bring(v) for k, v in kwargs.items()}

        return hook

    def _made(self, j: int):
        def hook(module, args, output):
            self.boundaries[j].made(output)

        return hook


def factors_to(module: nn.Module, device: torch.device) -> None:
    """The LoRA factors of `module`'s layers on `device` (the run moved them to the first device,
    `ops.lora_to`): moved on first use, kept there (the layer's `lora` tuple is replaced)."""
    for m in module.modules():
        lora = getattr(m, "lora", ())
        if lora and lora[0][0].device != device:
            m.lora = tuple((d.to(device), u.to(device), s) for d, u, s in lora)


def place_dit(model: nn.Module, devices: Sequence[str | DeviceBudget], budgets: Sequence[int] | None = None,
              workload=None, reserve: int = GiB, cards=None, transfers: Sequence[Transfer] | None = None,
              link_gbps: float = 12.5, activation_bytes: int | None = None,
              counts: Sequence[int] | None = None) -> MultiDeviceStreamer:  # fmt: skip
    """An MMDiT spread over several devices and attached: the core API of multi-device placement.

    devices: names ("cuda:0", "cuda:1", ...; see `parse_devices`) or `DeviceBudget`s; budgets: bytes per device
    for this model (default: each device's free memory); cards: their time models (default: detected);
    transfers: one per device (default: `default_transfer`); activation_bytes: kept free per device (None: the
    workload's estimate, `plan_dit_devices`); counts: blocks per device (None: the planner's choice).
    The model then takes its inputs on the first device and gives its output there (`pipeline.sample` runs on it
    as on one device)."""
    if devices and all(isinstance(d, DeviceBudget) for d in devices):
        specs = list(devices)
    else:
        from .costs import detect_card  # noqa: PLC0415

        names = [str(d) for d in devices]
        for d in names:
            check_device(d)
        if (budgets is None or cards is None) and any(torch.device(d).type != "cuda" for d in names):
            raise ValueError("place_dit: give budgets= and cards= for devices other than CUDA ones")
        if budgets is None:
            budgets = [int(torch.cuda.mem_get_info(torch.device(d))[0]) for d in names]
        if len(budgets) != len(names):
            raise ValueError(f"{len(budgets)} budgets for {len(names)} devices")
        cards = cards or [detect_card(torch.device(d)) for d in names]
        specs = [DeviceBudget(n, int(b), c) for n, b, c in zip(names, budgets, cards, strict=True)]
    plan = plan_dit_devices(model, specs, workload, reserve, activation_bytes, link_gbps, counts)
    if transfers is None:
        transfers = [default_transfer(s.device) for s in plan.stages]
    else:  # given for every listed device: keep those of the devices used
        by_name = dict(zip((s.name for s in specs), transfers, strict=True))
        transfers = [by_name[s.device] for s in plan.stages]
    head, blocks, tail = dit_parts(model)
    return MultiDeviceStreamer(model, head, blocks, tail, plan, transfers).attach()


def check_device(name: str) -> torch.device:
    """The torch device named `name`, or a clear error when this machine has no such device."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"'{name}' is not a device name (expected e.g. cuda:0)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if dev.index is None else dev.index
        if index >= count:
            have = ", ".join(f"cuda:{i}" for i in range(count)) or "no CUDA device"
            raise ValueError(f"'{name}' does not exist on this machine (it has {have})")
    elif dev.type != "cpu":
        raise ValueError(f"'{name}': only CUDA devices can share a model (got {dev.type})")
    return dev


def parse_devices(text: str) -> list[torch.device]:
    """ "cuda:0,cuda:1" -> the devices, each checked to exist, none listed twice; a clear error otherwise."""
    names = [d.strip() for d in str(text).split(",") if d.strip()]
    if not names:
        raise ValueError("no devices listed (expected e.g. cuda:0,cuda:1)")
    seen = set()
    for n in names:
        try:
            key = str(torch.device(n))
        except RuntimeError:
            raise ValueError(f"'{n}' is not a device name (expected e.g. cuda:0)") from None
        if key in seen:
            raise ValueError(f"{key} is listed twice")
        seen.add(key)
    return [check_device(n) for n in names]
