"""Using the executor across a job: out-of-memory re-planning (`Offloaded`) and component placement
(`Placement`: text encoder, then DiT, then VAE, each on the device only while it runs unless the budget
keeps it resident). The executor is offload.py, the planner offload_plan.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .offload import BlockStreamer, HostCopies, Transfer
from .offload_plan import Plan, Planner, split_blocks, whole_model_planner

# ---------------------------------------------------------------------------------------------------------
# Re-planning on out-of-memory
# ---------------------------------------------------------------------------------------------------------

OOM_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,)


class Offloaded:
    """A model attached with a plan from `planner`, which `run` re-plans once with half the resident
    blocks if a step runs out of memory. Host copies of streamed blocks persist across detach / attach
    until `detach(release_host=True)` (which leaving the context manager does)."""

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module], planner: Planner, transfer: Transfer,
                 root: nn.Module | None = None, errors: tuple[type[BaseException], ...] = OOM_ERRORS,
                 skip: Sequence[nn.Module] = (), tail: Sequence[nn.Module] = ()):  # fmt: skip
        self.model, self.blocks, self.planner, self.transfer, self.root = model, blocks, planner, transfer, root
        self.skip = skip  # modules left on the host (BlockStreamer's `skip`; the planner must leave them out)
        self.errors = errors
        self.streamer: BlockStreamer | None = None
        self.host = HostCopies(tail)  # tail: modules `skip` may name in some plans and not in others
        self.message = ""  # the last re-planning message (for the UI)
        self.placed_bytes = 0  # bytes moved to the device by attaches and re-plans so far (counted, for tests)

    @property
    def plan(self) -> Plan:
        return self.streamer.plan

    def attach(self, max_resident: int | None = None) -> Offloaded:
        self.replan(max_resident)
        return self

    def replan(self, max_resident: int | None = None) -> Plan:
        """Plan again (the planner's budget or workload changed, or `skip`) and move only the difference: tensors
        resident in both plans keep their device copies, so growing or shrinking is not a full re-upload."""
        plan = self.planner(self.transfer.free_memory(), max_resident)
        old = self.streamer.plan if self.attached else None
        same_skip = old is not None and [id(m) for m in self.streamer.skipped] == [id(m) for m in self.skip]
        if same_skip and (old.streamed, old.buffers, old.staging_bytes) == (
            plan.streamed,
            plan.buffers,
            plan.staging_bytes,
        ):
            return old
        kept = self.streamer.detach(keep=True) if self.attached else {}
        self.streamer = BlockStreamer(self.model, self.blocks, plan, self.transfer, self.root, self.host, self.skip)
        self.streamer.attach(reuse=kept)
        self.placed_bytes += self.streamer.stats.load_bytes
        return plan

    @property
    def attached(self) -> bool:
        return self.streamer is not None and self.streamer._attached

    def detach(self, release_host: bool = False) -> None:
        if self.streamer is not None:
            self.streamer.detach()
        if release_host:
            self.host.release(self.transfer)

    def __enter__(self) -> Offloaded:
        return self if self.attached else self.attach()

    def __exit__(self, *exc) -> None:
        self.detach(release_host=True)

    def run(self, fn: Callable, *args, **kwargs):
        """fn(*args, **kwargs); on an out-of-memory error: fewer resident blocks, one retry, a warning. The
        retry runs after the handler is left, so the failed attempt's tensors (held by its traceback) are freed."""
        try:
            return fn(*args, **kwargs)
        except self.errors as e:
            failure = type(e).__name__
        before = self.plan
        self.detach()
        self.transfer.empty_cache()
        self.attach(max_resident=len(before.resident) // 2)
        self.message = (
            f"out of memory during a step ({failure}); re-planned from {len(before.resident)} to "
            f"{len(self.plan.resident)} resident blocks and retrying once: {self.plan.explain()}"
        )
        warnings.warn(self.message, stacklevel=2)
        return fn(*args, **kwargs)

    def guarded(self, fn: Callable) -> Callable:
        """fn wrapped in `run`, e.g. the DiT call of each sampling step (a failed step is retried alone)."""
        return lambda *args, **kwargs: self.run(fn, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Component placement across a job
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Component:
    """A model the job runs. `planner(free, max_resident)` plans its blocks (None: the whole model is one
    resident unit, like the VAE); `on_device=False` runs it where its weights are (e.g. the text encoder
    on the CPU by choice); `skip`: modules left on the host, neither placed nor streamed (the DiT's modulation
    layers when the sampler precomputes them, with a planner made by `plan_dit(modulation=True)`)."""

    name: str
    model: nn.Module
    blocks: Sequence[nn.Module] = ()
    planner: Planner | None = None
    on_device: bool = True
    root: nn.Module | None = None
    skip: Sequence[nn.Module] = ()


class Placement:
    """Text encoder -> DiT -> VAE: each component on the device while it runs (`before` / `after`, or the
    `running` context manager). After running, a component stays placed only if every on-device
    component fits at once, all resident, within `budget` (then nothing is moved between jobs);
    otherwise it is detached and others are detached before a component that needs their room.

    budget: device bytes this job may use in total (the caller derives it from the free memory and the
    host's flags); the planners are called with what is left of it beside the components still placed.
    """

    def __init__(self, transfer: Transfer, budget: int, components: Sequence[Component] = ()):
        self.transfer, self.budget = transfer, budget
        self.components = {c.name: c for c in components}
        self.placed: dict[str, Offloaded] = {}  # in placement order (oldest first)
        self._offloaded: dict[str, Offloaded] = {}  # every component run so far, with its host copies
        self.log: list[str] = []

    @property
    def device(self) -> torch.device:
        """Where placed components compute (a pipeline should run here, wherever the DiT's weights are)."""
        return self.transfer.device

    def add(self, component: Component) -> None:
        self.components[component.name] = component

    def _full_bytes(self, c: Component) -> int:
        planner = c.planner or whole_model_planner(c.model)
        plan = planner(1 << 62, None)  # unbounded: the all-resident plan
        return sum(plan.block_bytes) + plan.fixed_bytes + plan.activation_bytes + plan.reserve

    def keeps_all(self) -> bool:
        """True when every on-device component fits at once, all resident."""
        return sum(self._full_bytes(c) for c in self.components.values() if c.on_device) <= self.budget

    def held(self, but: str | None = None) -> int:
        return sum(o.plan.device_bytes for n, o in self.placed.items() if n != but)

    def before(self, name: str) -> Offloaded | None:
        """Place a component for running (evicting others when it needs their room); returns its placement."""
        c = self.components[name]
        if not c.on_device:
            return None
        if name in self.placed:
            return self.placed[name]
        planner = c.planner or whole_model_planner(c.model)
        for other in [n for n in self.placed if n != name]:
            if self._full_bytes(c) <= self.budget - self.held():
                break
            self.placed.pop(other).detach()  # oldest first
            self.log.append(f"offloaded {other} for {name}")
        left = self.budget - self.held()

        def bounded(free: int | None, max_resident: int | None) -> Plan:
            return planner(left if free is None else min(left, free), max_resident)

        off = self._offloaded.get(name) or Offloaded(c.model, c.blocks, bounded, self.transfer, c.root, skip=c.skip)
        self._offloaded[name] = off
        off.planner = bounded
        self.placed[name] = off.attach()
        self.log.append(self.placed[name].plan.explain())
        return self.placed[name]

    def after(self, name: str) -> None:
        """Done running: keep the component placed if the budget holds everything, else detach it."""
        if name in self.placed and not self.keeps_all():
            self.placed.pop(name).detach()

    @contextmanager
    def running(self, name: str) -> Iterator[Offloaded | None]:
        placed = self.before(name)
        try:
            yield placed
        finally:
            self.after(name)

    def release_all(self) -> None:
        """Detach everything and drop the pinned host copies (the host needs the memory for other models)."""
        for off in self._offloaded.values():
            off.detach(release_host=True)
        self.placed.clear()
        self.transfer.empty_cache()

    def vae_budget(self, vae: nn.Module, reserve: int = 0) -> int:
        """Bytes for the VAE's working memory (its `budget=`), beside everything still placed and its weights."""
        held = self.held() if "vae" not in self.placed else self.held(but="vae")
        return max(0, self.budget - held - split_blocks(vae, [])[1] - reserve)
