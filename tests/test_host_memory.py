"""Host memory and failures of the offload executor (issue 13, 6), on CPU through the device seam: pinned bytes
within a cap (pageable beyond it, or when the driver refuses to pin), given back when host copies are released;
nested streamed sets, so plans for several workloads share their pinned copies; an attach that fails half-way
leaves nothing placed behind."""

from __future__ import annotations

import pytest
import torch

from qwen_image_core import offload as O
from qwen_image_core import offload_plan as P
from qwen_image_core.placement import Offloaded
from qwen_image_core.transfer import PinBudget


class PinnedTransfer(O.Transfer):
    """The CPU Transfer with a pin budget: "pinned" buffers are tagged so tests can count them."""

    def __init__(self, cap, refuse_after=None):
        super().__init__()
        self.made = 0

        def pin(n):
            self.made += 1
            if refuse_after is not None and self.made > refuse_after:
                raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
            return torch.empty(n, dtype=torch.uint8)

        self.pins = PinBudget(cap, pin)

    def host_buffer(self, nbytes):
        return self.pins.allocate(nbytes)

    def free_host(self, buffers):
        self.pins.release(buffers)


def toy(n=12, width=32):
    blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(n))
    return torch.nn.Sequential(torch.nn.Linear(4, width), *blocks), blocks


def plan_for(model, blocks, streamed):
    sizes, fixed = P.split_blocks(model, blocks)
    resident = len(blocks) - streamed
    return lambda free, mr: P.plan_blocks(sizes, fixed, 1 << 40, 0, 0, 1e-3, 1e9, max_resident=resident)


def test_pin_budget_caps_pins_falls_back_to_pageable_and_gives_bytes_back():
    b = PinBudget(100, pin=lambda n: torch.empty(n, dtype=torch.uint8))
    x, y = b.allocate(60), b.allocate(60)  # the second does not fit: pageable
    assert b.used == 60
    b.release([y])
    assert b.used == 60
    b.release([x])
    assert b.used == 0
    refusing = PinBudget(None, pin=lambda n: (_ for _ in ()).throw(RuntimeError("cudaHostAlloc failed")))
    assert refusing.allocate(10).numel() == 10 and refusing.used == 0 and refusing.refused == 1


@pytest.mark.parametrize("cap", [None, 20000])
def test_several_workloads_share_their_pinned_copies(cap):
    """Four plans streaming 3, 5, 4, 7 of 12 blocks: the host copies are those of the largest set only (nested
    sets), the pinned bytes never exceed the cap, and releasing gives every pinned byte back."""
    model, blocks = toy()
    t = PinnedTransfer(cap)
    off = None
    packed_after = []
    for streamed in (3, 5, 4, 7):
        planner = plan_for(model, blocks, streamed)
        off = off or Offloaded(model, blocks, planner, t)
        off.planner = planner
        off.replan()
        packed_after.append(len(off.host.packed))
        assert cap is None or t.pins.used <= cap
        assert set(off.plan.streamed) <= set(P.interleave(12, 7))
    assert packed_after == [3, 5, 5, 7]  # a smaller set reuses the copies of a larger one
    off.detach(release_host=True)
    assert t.pins.used == 0 and t.allocated == 0


class FailingTransfer(O.Transfer):
    def __init__(self, fail_at):
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def to_device(self, t):
        self.calls += 1
        if self.calls == self.fail_at:
            raise torch.OutOfMemoryError("test: out of memory while placing")
        return super().to_device(t)


def test_an_attach_that_fails_half_way_is_rolled_back():
    model, blocks = toy()
    x = torch.randn(2, 4)
    with torch.no_grad():
        reference = model(x)
    originals = {id(p): p.data.data_ptr() for p in model.parameters()}
    t = FailingTransfer(fail_at=7)
    streamer = O.BlockStreamer(model, blocks, plan_for(model, blocks, 4)(None, None), t)
    with pytest.raises(torch.OutOfMemoryError):
        streamer.attach()
    assert t.allocated == 0 and not streamer._attached  # nothing left on the "device"
    assert {id(p): p.data.data_ptr() for p in model.parameters()} == originals  # every tensor back home
    with streamer, torch.no_grad():  # and the next attach works, with the same result
        assert torch.equal(model(x), reference)
    assert t.allocated == 0
