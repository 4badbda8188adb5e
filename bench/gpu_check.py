"""One command that settles the open GPU questions of the CUDA path (issue 13, 7; plan: gpu_review.md §5).

    python bench/gpu_check.py [--out DIR] [--budget 540]     # on a CUDA GPU: real shapes, about 8 minutes
    python bench/gpu_check.py --tiny [--out DIR]             # anywhere: tiny shapes, seconds (the test suite runs it)

Phases (each skipped once the time budget is spent; every error is recorded, never fatal):
  0 environment        torch / CUDA / cuDNN, device properties, SDPA priority order
  1 attention          SDPA at the real joint shape: no mask, our old bool key mask, `attention.per_row`; kernels used
  2 one block          a full-width fp8 DoubleStreamBlock at 1328² CFG: ms, op categories, peak vs the estimate
  3 casts and syncs    fp8 / scaled-fp8 casts, LoRA beside the layer vs merged, host syncs of a forward
  4 executor stress    streamed = resident bit for bit with sleeps injected on both streams, a failing pass,
                       attach/detach cycles: device memory back to baseline
  5 overlap            the 60-block fp8 model (tiny: 6 blocks) streamed with several plans at 1328² CFG and 1024²
                       cfg 1: measured pass time vs `simulate()` fed the measured compute and bandwidth
  6 OOM and pins       out-of-memory re-plan, a failing attach rolled back, nested pinned copies over 4 workloads
  7 compile            one block under torch.compile (inductor)
  8 modulation         AdaLN modulation precomputed for 20 steps: equal forwards, bytes freed, precompute vs per step
  9 matmul             fp8 (_scaled_mm) and int8 (_int_mm) seams at the MLP shape: ms and error vs dequantised
 10 compile streamed   per-block compile (compiled.using) with 2 of 3 blocks streaming: equal, no recompiles
Writes gpu_check.json (every number and verdict) and gpu_check.txt (a summary) to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check_seams as seams  # noqa: E402

from qwen_image_core import offload as O  # noqa: E402
from qwen_image_core import offload_plan as P  # noqa: E402
from qwen_image_core import rope  # noqa: E402
from qwen_image_core.attention import attention, per_row  # noqa: E402
from qwen_image_core.formats.common import assign_weights  # noqa: E402
from qwen_image_core.mmdit import DoubleStreamBlock, MMDiT, MMDiTConfig  # noqa: E402
from qwen_image_core.ops import Linear, lora_to  # noqa: E402
from qwen_image_core.placement import Offloaded  # noqa: E402
from qwen_image_core.transfer import CudaTransfer, Transfer, default_transfer, measure_h2d_gbps  # noqa: E402

FP8 = torch.float8_e4m3fn


class Check:
    """Phase runner: time budget, results, verdicts."""

    def __init__(self, device: torch.device, tiny: bool, budget: float):
        self.device, self.tiny, self.budget, self.start = device, tiny, budget, time.monotonic()
        self.cuda = device.type == "cuda"
        self.results: dict = {"device": str(device), "tiny": tiny, "phases": {}}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def phase(self, name: str, fn, need: float) -> None:
        entry = self.results["phases"].setdefault(name, {})
        if self.left() < need:
            entry["skipped"] = f"{self.left():.0f} s left of the budget, the phase needs about {need:.0f} s"
            return
        t0 = time.monotonic()
        try:
            fn(entry)
        except Exception as e:  # a failure is a finding: record it and go on
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc(limit=6)
        entry["seconds"] = round(time.monotonic() - t0, 2)
        if self.cuda:
            torch.cuda.empty_cache()

    def verdict(self, entry: dict, name: str, ok: bool, detail=None) -> None:
        entry.setdefault("verdicts", {})[name] = {"ok": bool(ok), **({"detail": detail} if detail is not None else {})}

    def timed(self, fn, warmup: int = 2, runs: int = 5) -> float:
        """Median seconds of fn() (CUDA events on a GPU)."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)


def config(c: Check, layers: int) -> MMDiTConfig:
    if c.tiny:
        return MMDiTConfig(num_layers=layers, num_heads=3, head_dim=32, mlp_dim=384, text_dim=40, rope_axes=(4, 14, 14))
    return MMDiTConfig(num_layers=layers)


def random_dit(c: Check, layers: int, fp8: bool = True) -> MMDiT:
    """A DiT with random weights made on the device (fast) and kept on the host (what the executor streams from)."""
    cfg = config(c, layers)
    with torch.device("meta"):
        model = MMDiT(cfg)
    sd = {}
    g = torch.Generator(device=c.device).manual_seed(0)
    for k, v in model.state_dict().items():
        t = torch.randn(v.shape, generator=g, device=c.device) * (0.02 if v.ndim == 2 else 0.1)
        if v.ndim == 1 and "norm" in k:
            t = t + 1.0
        sd[k] = (
            t.to(FP8) if fp8 and v.ndim == 2 and k.startswith("transformer_blocks.") else t.to(torch.bfloat16)
        ).cpu()
    return assign_weights(model, sd, {}, "random", "Qwen-Image DiT").eval()


def workload(c: Check, px: int, cfg: bool):
    """Latent, timestep, text and lengths of one step at px² (tiny: 64²), rows = 2 with CFG."""
    px = 64 if c.tiny else px
    rows, text = (2 if cfg else 1), (16 if c.tiny else 256)
    cfgm = config(c, 1)
    dt = torch.bfloat16 if c.cuda else torch.float32
    img = torch.randn(rows, 16, px // 8, px // 8, device=c.device, dtype=dt)
    txt = torch.randn(rows, text, cfgm.text_dim, device=c.device, dtype=dt)
    lengths = [text, text - 40 if not c.tiny else text - 5][:rows]
    return img, torch.full((rows,), 0.6, device=c.device), txt, lengths


# ---------------------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------------------


def environment(c: Check, e: dict) -> None:
    e.update(torch=torch.__version__, python=platform.python_version(), cuda=torch.version.cuda)
    if c.cuda:
        p = torch.cuda.get_device_properties(c.device)
        e.update(name=p.name, total_gib=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                 sms=getattr(p, "multi_processor_count", None), clock_rate_present=hasattr(p, "clock_rate"),
                 capability=f"{p.major}.{p.minor}")  # fmt: skip
        with contextlib.suppress(Exception):
            e["sdp_priority"] = [str(b) for b in torch._C._get_sdp_priority_order()]
        e["card"] = str(P.detect_card(c.device))


def attention_kernels(c: Check, e: dict) -> None:
    heads, n_img, text, hd = (3, 48, 16, 32) if c.tiny else (24, 6889, 256, 128)
    dt = torch.bfloat16 if c.cuda else torch.float32
    q, k, v = (torch.randn(2, heads, text + n_img, hd, device=c.device, dtype=dt) for _ in range(3))
    short = text - (5 if c.tiny else 200)
    mask = torch.ones(2, text + n_img, dtype=torch.bool, device=c.device)
    mask[1, short:text] = False
    rows = per_row(attention, [text, short], text)
    e["ms_no_mask"] = 1e3 * c.timed(lambda: F.scaled_dot_product_attention(q, k, v))
    e["ms_bool_mask"] = 1e3 * c.timed(lambda: attention(q, k, v, mask))
    e["ms_per_row"] = 1e3 * c.timed(lambda: rows(q, k, v))
    diff = (rows(q, k, v).float() - attention(q, k, v, mask).float()).abs().max().item()
    c.verdict(e, "per_row_equals_mask", diff <= (2e-2 if c.cuda else 1e-5), diff)
    e["mask_slowdown"] = e["ms_bool_mask"] / e["ms_no_mask"]
    if c.cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                attention(q, k, v, mask)
            c.verdict(e, "flash_refuses_the_mask", False, "flash ran with a mask")
        except RuntimeError:
            c.verdict(e, "flash_refuses_the_mask", True)
        e["kernels"] = kernel_names(lambda: (attention(q, k, v, mask), rows(q, k, v)))


def kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {ev.key for ev in prof.key_averages()}
    return sorted(n for n in names if any(s in n.lower() for s in ("flash", "fmha", "efficient", "cudnn", "attention")))


def one_block(c: Check, e: dict) -> None:
    model = random_dit(c, 1)
    block = model.transformer_blocks[0].to(c.device)
    img, t, txt, lengths = workload(c, 1328, True)
    cfg, dt = model.config, img.dtype
    h = torch.randn(2, (img.shape[-1] // 2) * (img.shape[-2] // 2), cfg.hidden, device=c.device, dtype=dt)
    tx = torch.randn(2, txt.shape[1], cfg.hidden, device=c.device, dtype=dt)
    temb = torch.randn(2, cfg.hidden, device=c.device, dtype=dt)
    grid = (img.shape[-2] // 2, img.shape[-1] // 2)
    pe = rope.rope_table(rope.joint_positions([grid], txt.shape[1], c.device), cfg.rope_axes, cfg.rope_theta)
    mask = torch.ones(2, tx.shape[1] + h.shape[1], dtype=torch.bool, device=c.device)
    mask[1, lengths[1] : tx.shape[1]] = False
    rows = per_row(attention, lengths, tx.shape[1])
    with torch.no_grad():
        if c.cuda:
            torch.cuda.reset_peak_memory_stats(c.device)
            base = torch.cuda.memory_allocated(c.device)
        e["ms_per_row"] = 1e3 * c.timed(lambda: block(h, tx, temb, pe, None, None, rows))
        if c.cuda:
            peak = torch.cuda.max_memory_allocated(c.device) - base
            wl = P.DiTWorkload(1328, 1328, cfg=True, text_tokens=tx.shape[1])
            estimate = P.dit_activation_bytes(wl, cfg.hidden, cfg.mlp_dim)
            e.update(peak_gib=peak / 2**30, estimate_gib=estimate / 2**30)
            c.verdict(e, "peak_within_estimate", peak <= estimate + P.tensor_bytes(block), f"{peak / estimate:.2f}x")
        e["ms_bool_mask"] = 1e3 * c.timed(lambda: block(h, tx, temb, pe, mask, None))
        e["predicted_60_blocks_s"] = e["ms_per_row"] * 60 / 1e3
        if c.cuda:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                block(h, tx, temb, pe, None, None, rows)
                torch.cuda.synchronize()
            e["top_kernels_ms"] = {
                ev.key[:60]: round(ev.device_time_total / 1e3, 3)
                for ev in sorted(prof.key_averages(), key=lambda ev: -ev.device_time_total)[:15]
            }


def casts_and_syncs(c: Check, e: dict) -> None:
    out_f, in_f = (384, 96) if c.tiny else (12288, 3072)
    dt = torch.bfloat16 if c.cuda else torch.float32
    layer = Linear(in_f, out_f).to(c.device)
    layer.weight.data = layer.weight.data.to(FP8)
    x = torch.randn(2, 64 if c.tiny else 4096, in_f, device=c.device, dtype=dt)
    with torch.no_grad():
        e["ms_fp8_linear"] = 1e3 * c.timed(lambda: layer(x))
        layer.weight_scale = torch.tensor(0.01, device=c.device)
        e["ms_scaled_fp8_linear"] = 1e3 * c.timed(lambda: layer(x))
        rank = 8 if c.tiny else 64
        layer.lora = ((torch.randn(rank, in_f) * 0.01, torch.randn(out_f, rank) * 0.01, 1.0),)
        lora_to(layer, c.device, dt)
        e["ms_lora_beside"] = 1e3 * c.timed(lambda: layer(x))
        e["ms_lora_merged"] = 1e3 * c.timed(lambda: F.linear(x, layer.compute_weight(dt), layer.bias.to(dt)))
    model = random_dit(c, 2).to(c.device)
    img, t, txt, lengths = workload(c, 1024, True)
    syncs = count_syncs(c, lambda: model(img, t, txt, txt_lengths=lengths))
    e["host_syncs_per_forward"] = syncs
    c.verdict(e, "no_host_syncs_in_a_forward", syncs == 0, syncs)


def count_syncs(c: Check, fn) -> int:
    """Synchronising CUDA calls during fn (torch.cuda.set_sync_debug_mode); on CPU the host reads (.item())."""
    with torch.no_grad():
        if c.cuda:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            return sum("synchroniz" in str(w.message) for w in caught)
        from torch.utils._python_dispatch import TorchDispatchMode

        class Reads(TorchDispatchMode):
            n = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                Reads.n += func is torch.ops.aten._local_scalar_dense.default
                return func(*args, **(kwargs or {}))

        with Reads():
            fn()
        return Reads.n


class SlowCopies(CudaTransfer):
    """Copies that first make the copy stream sleep: widens the window in which a wrong order would corrupt."""

    def copy(self, dst, src, after):
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(2_000_000)
        return super().copy(dst, src, after)


def streamed(model, plan, transfer, fn):
    with O.BlockStreamer(model, model.transformer_blocks, plan, transfer) as s, torch.no_grad():
        return fn(), s.stats


def plan_with(model, resident: int, buffers: int):
    sizes, fixed = P.split_blocks(model, model.transformer_blocks)
    n = len(sizes)
    plan = P.plan_blocks(sizes, fixed, 1 << 62, 0, 0, 1.0, 1e9, max_resident=resident)
    return plan if not plan.streamed or plan.buffers == min(buffers, len(plan.streamed)) else P.Plan(
        plan.name, plan.storage, n, plan.streamed, min(buffers, len(plan.streamed)), plan.block_bytes,
        plan.fixed_bytes, plan.staging_bytes, 0, 0, plan.free, plan.compute_s, plan.step_s)  # fmt: skip


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


def compiled(c: Check, e: dict) -> None:
    cfg = config(c, 1)
    block = DoubleStreamBlock(cfg).to(c.device).eval()
    dt = torch.bfloat16 if c.cuda else torch.float32
    n, text = (64, 16) if c.tiny else (4096, 256)
    h, tx = (
        torch.randn(1, n, cfg.hidden, device=c.device, dtype=dt),
        torch.randn(1, text, cfg.hidden, device=c.device, dtype=dt),
    )
    temb = torch.randn(1, cfg.hidden, device=c.device, dtype=dt)
    side = int(n**0.5)
    pe = rope.rope_table(rope.joint_positions([(side, n // side)], text, c.device), cfg.rope_axes, cfg.rope_theta)
    block = block.to(dt)
    with torch.no_grad():
        eager = block(h, tx, temb, pe, None, None)
        fast = torch.compile(block)
        t0 = time.monotonic()
        out = fast(h, tx, temb, pe, None, None)
        e["compile_s"] = round(time.monotonic() - t0, 1)
        e["ms_eager"] = 1e3 * c.timed(lambda: block(h, tx, temb, pe, None, None))
        e["ms_compiled"] = 1e3 * c.timed(lambda: fast(h, tx, temb, pe, None, None))
    diff = (out[0].float() - eager[0].float()).abs().max().item() / max(1e-6, eager[0].float().abs().max().item())
    c.verdict(e, "compiled_matches", diff <= (1e-2 if c.cuda else 1e-4), diff)


PHASES = [  # (name, function, seconds needed on a GPU)
    ("0_environment", environment, 5),
    ("1_attention", attention_kernels, 30),
    ("2_one_block", one_block, 45),
    ("3_casts_and_syncs", casts_and_syncs, 40),
    ("4_executor_stress", executor_stress, 90),
    ("5_overlap", overlap, 180),
    ("6_oom_and_pins", oom_and_pins, 40),
    ("7_compile", compiled, 60),
]
_HELPERS = SimpleNamespace(random_dit=random_dit, workload=workload, plan_with=plan_with, FP8=FP8)
PHASES += [  # issue 13's seams (bench/gpu_check_seams.py)
    (name, lambda c, e, fn=fn: fn(c, e, _HELPERS), need)
    for name, fn, need in (
        ("8_modulation", seams.modulation_phase, 30),
        ("9_matmul", seams.matmul_phase, 20),
        ("10_compile_streamed", seams.compile_streamed, 90),
    )
]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (any device; seconds)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all phases")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for gpu_check.json / .txt")
    ap.add_argument("--phases", default="", help="comma-separated phase numbers to run (default: all)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = Check(device, args.tiny or device.type != "cuda", args.budget)
    wanted = {p.strip() for p in args.phases.split(",") if p.strip()}
    for name, fn, need in PHASES:
        if not wanted or name.split("_")[0] in wanted:
            c.phase(name, lambda entry, fn=fn: fn(c, entry), 0 if c.tiny else need)
    c.results["seconds"] = round(time.monotonic() - c.start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(c.results, indent=1, default=str))
    lines = [f"gpu_check on {c.results['device']} (tiny={c.tiny}), {c.results['seconds']} s"]
    for name, entry in c.results["phases"].items():
        verdicts = entry.get("verdicts", {})
        status = "ERROR " + entry["error"] if "error" in entry else ("skipped" if "skipped" in entry else "ok")
        lines.append(f"{name}: {status}")
        lines += [f"  {'PASS' if v['ok'] else 'FAIL'} {k} {v.get('detail', '')}" for k, v in verdicts.items()]
        lines += [f"  {k} = {v}" for k, v in entry.items() if isinstance(v, (int, float)) and k != "seconds"]
    (out / "gpu_check.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return c.results


if __name__ == "__main__":
    main()
