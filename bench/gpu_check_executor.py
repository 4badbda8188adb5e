"""bench/gpu_check.py phases on the offload executor: 4 executor stress, 5 overlap, 6 OOM and pins (see
gpu_check.py for what each settles)."""

from __future__ import annotations

import contextlib
import time
import warnings

import torch
from gpu_check_common import Check, plan_with, random_dit, streamed, workload

from qwen_image_core import offload as O
from qwen_image_core import offload_plan as P
from qwen_image_core.placement import Offloaded
from qwen_image_core.transfer import CudaTransfer, Transfer, default_transfer, measure_h2d_gbps


class SlowCopies(CudaTransfer):
    """Copies that first make the copy stream sleep: widens the window in which a wrong order would corrupt."""

    def copy(self, dst, src, after):
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(2_000_000)
        return super().copy(dst, src, after)


def executor_stress(c: Check, e: dict) -> None:
    model = random_dit(c, 6)
    img, t, txt, lengths = workload(c, 512, True)
    fwd = lambda: model(img, t, txt, txt_lengths=lengths)  # noqa: E731
    ref, _ = streamed(model, plan_with(model, 6, 2), default_transfer(c.device), fwd)
    base = torch.cuda.memory_allocated(c.device) if c.cuda else 0
    results = {}
    for resident in (0, 1, 3):
        for buffers in (2, 3):
            for slow in (False, True) if c.cuda else (False,):
                transfer = SlowCopies(c.device) if slow else default_transfer(c.device)
                sleeper = []
                if slow:  # the compute stream sleeps before each streamed block too (the other race window)
                    sleeper = [b.register_forward_pre_hook(lambda m, a: torch.cuda._sleep(2_000_000))
                               for b in model.transformer_blocks]  # fmt: skip
                out, stats = streamed(model, plan_with(model, resident, buffers), transfer, fwd)
                for h in sleeper:
                    h.remove()
                results[f"{resident}r_{buffers}k{'_slow' if slow else ''}"] = bool(torch.equal(out, ref))
    c.verdict(e, "streamed_equals_resident", all(results.values()), results)
    # a pass that fails in block 3, then a good pass
    transfer = default_transfer(c.device)
    streamer = O.BlockStreamer(model, model.transformer_blocks, plan_with(model, 1, 2), transfer).attach()
    hook = model.transformer_blocks[3].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("x")))
    with contextlib.suppress(RuntimeError), torch.no_grad():
        fwd()
    hook.remove()
    with torch.no_grad():
        again = fwd()
    streamer.detach()
    c.verdict(e, "a_failed_pass_leaves_the_next_exact", bool(torch.equal(again, ref)))
    for i in range(10):  # attach / detach cycles with other plans
        s = O.BlockStreamer(model, model.transformer_blocks, plan_with(model, i % 6, 2 + i % 2), transfer).attach()
        s.detach()
    if c.cuda:
        torch.cuda.synchronize()
        left = torch.cuda.memory_allocated(c.device) - base
        c.verdict(e, "device_memory_back_to_baseline", left <= 0, left)


def overlap(c: Check, e: dict) -> None:
    blocks = 6 if c.tiny else 60
    t0 = time.monotonic()
    model = random_dit(c, blocks)
    e["build_s"] = round(time.monotonic() - t0, 1)
    if c.cuda:
        e["h2d_pinned_gbps"] = measure_h2d_gbps(c.device)
    gbps = e.get("h2d_pinned_gbps", 25.0)
    transfer = default_transfer(c.device)
    off = None
    for px, cfg in ((1328, True), (1024, False)):
        img, t, txt, lengths = workload(c, px, cfg)
        fwd = lambda img=img, t=t, txt=txt, lengths=lengths: model(img, t, txt, txt_lengths=lengths)  # noqa: E731
        rows = {}
        for resident in (blocks, blocks // 2, blocks // 4, 0):
            for buffers in (2, 3):
                if resident == blocks and buffers == 3:
                    continue
                plan = plan_with(model, resident, buffers)
                off = off or Offloaded(model, model.transformer_blocks, None, transfer)
                off.planner = lambda free, mr, plan=plan: plan
                t1 = time.monotonic()
                off.replan()
                attach_s = time.monotonic() - t1
                with torch.no_grad():
                    step = c.timed(fwd, warmup=1, runs=3)
                rows[f"{resident}r_{buffers}k"] = {"s": step, "attach_s": round(attach_s, 2), "plan": plan}
        compute = rows[f"{blocks}r_2k"]["s"] / blocks  # measured per-block compute (all resident)
        for row in rows.values():
            plan = row.pop("plan")
            copy = [b / (gbps * 1e9) for b in plan.block_bytes]
            row["simulated_s"] = P.simulate([compute] * blocks, copy, plan.streamed, max(plan.buffers, 1))
            row["ratio"] = row["s"] / row["simulated_s"]
        e[f"{px}_{'cfg' if cfg else 'cfg1'}"] = rows
        worst = max(r["ratio"] for r in rows.values())
        if c.cuda:  # (the CPU copies synchronously: nothing to overlap there)
            c.verdict(e, f"{px}_within_10pct_of_simulation", worst <= 1.10, round(worst, 3))
    if off is not None:
        e["pinned_gib"] = off.host.nbytes / 2**30
        off.detach(release_host=True)


def oom_and_pins(c: Check, e: dict) -> None:
    model = random_dit(c, 6)

    class FailingAttach(Transfer if not c.cuda else CudaTransfer):
        calls = 0

        def to_device(self, x):
            FailingAttach.calls += 1
            if FailingAttach.calls == 7:
                raise torch.OutOfMemoryError("injected")
            return super().to_device(x)

    transfer = FailingAttach(c.device)
    base = transfer.allocated
    with contextlib.suppress(torch.OutOfMemoryError):
        O.BlockStreamer(model, model.transformer_blocks, plan_with(model, 4, 2), transfer).attach()
    left = [p for p in model.parameters() if transfer.on_device(p)]
    c.verdict(e, "failed_attach_rolled_back", not left and transfer.allocated == base, len(left))
    # nested pinned copies over four workloads: the union is the largest streamed set
    off, transfer = None, default_transfer(c.device)
    pinned = []
    for resident in (3, 1, 2, 0):  # streamed sets of 3, 5, 4, 6 blocks
        plan = plan_with(model, resident, 2)
        off = off or Offloaded(model, model.transformer_blocks, None, transfer)
        off.planner = lambda free, mr, plan=plan: plan
        off.replan()
        pinned.append(len(off.host.packed))
    off.detach(release_host=True)
    c.verdict(e, "pinned_copies_nested", pinned == [3, 5, 5, 6], pinned)
    if c.cuda:  # a real out-of-memory: re-plan with fewer resident blocks and retry once
        total = torch.cuda.get_device_properties(c.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated() + (2 << 30)) / total))
        try:
            planner = lambda free, mr: plan_with(model, 6 if mr is None else mr, 2)  # noqa: E731
            off = Offloaded(model, model.transformer_blocks, planner, default_transfer(c.device)).attach()
            big_img, bt, btxt, blen = workload(c, 2048, True)
            with torch.no_grad(), warnings.catch_warnings(record=True):
                off.run(lambda: model(big_img, bt, btxt, txt_lengths=blen))
            e["oom_message"] = off.message
            c.verdict(e, "oom_replanned_and_finished", True)
        except torch.OutOfMemoryError as err:
            c.verdict(e, "oom_replanned_and_finished", False, str(err)[:200])
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
