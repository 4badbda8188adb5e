"""Shared parts of bench/gpu_check.py: the phase runner (`Check`: time budget, results, verdicts, timing), the random
DiT and step workload at the real or tiny sizes, streaming plans with a chosen split, and the host-sync counter."""

from __future__ import annotations

import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_image_core import offload as O  # noqa: E402
from qwen_image_core import offload_plan as P  # noqa: E402
from qwen_image_core.formats.common import assign_weights  # noqa: E402
from qwen_image_core.mmdit import MMDiT, MMDiTConfig  # noqa: E402

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
