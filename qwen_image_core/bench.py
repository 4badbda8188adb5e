"""`python -m qwen_image_core bench`: time a few DiT steps on this machine, beside the planner's prediction.

The DiT is the user's file (`--dit`) or synthetic random weights (the default: a tiny configuration that runs on
any CPU in seconds; `--synthetic full` builds the 20B widths with `--layers` blocks). Each step is one forward
pass with cond and uncond batched (CFG) or cond alone, on random latents and text embeddings of the job's size.
Measured: seconds per step (median after one warm-up step), peak device memory, bytes copied to the device per
step (0 here: the model is placed whole on the device; streaming is measured in ComfyUI). Predicted: the
planner's placement and step time for the device's card (`--card` names one of costs.CARDS on machines
without CUDA). The last line is meant to be pasted into an issue.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .costs import CARDS, GiB, detect_card
from .mmdit import MMDiT, MMDiTConfig, load_dit
from .offload_plan import DiTWorkload, plan_dit

# the synthetic tiny DiT: every code path at toy widths (3 heads x 32 channels, MLP 4 x 96, text 40 wide)
TINY = dict(num_layers=2, num_heads=3, head_dim=32, mlp_dim=384, text_dim=40, rope_axes=(4, 14, 14))
TEXT_TOKENS = 64  # prompt tokens per image in the timed passes (a typical short prompt after the template)


@dataclass(frozen=True)
class BenchResult:
    what: str  # the DiT: file name or "synthetic tiny"
    device: str  # e.g. "cuda:0 NVIDIA H200" or "cpu"
    dtype: str  # compute dtype
    workload: str  # e.g. "256x256 CFG"
    steps: int  # timed steps (after one warm-up)
    s_per_step: float  # median seconds per step
    peak_bytes: int  # peak device memory allocated (0 on CPU: not tracked)
    streamed_bytes: int  # bytes copied to the device per step (0: placed whole)
    plan: str  # the planner's placement for this card and workload
    plan_s_per_step: float  # the planner's predicted seconds per step
    plan_streamed_bytes: int  # bytes the planner would stream per step

    def table(self) -> str:
        rows = [
            ("model", self.what),
            ("device", f"{self.device}, {self.dtype}"),
            ("workload", f"{self.workload}, {self.steps} timed steps"),
            ("s/step", f"{self.s_per_step:.4f} measured | {self.plan_s_per_step:.4f} predicted"),
            ("peak VRAM", f"{self.peak_bytes / GiB:.2f} GiB" if self.peak_bytes else "n/a (not a CUDA device)"),
            (
                "streamed/step",
                f"{self.streamed_bytes / 1e9:.2f} GB measured | {self.plan_streamed_bytes / 1e9:.2f} GB predicted",
            ),
            ("plan", self.plan),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def issue_line(self) -> str:
        return (
            f"qwenpix bench | {self.what} | {self.device} {self.dtype} | {self.workload} | "
            f"{self.s_per_step:.4f} s/step (plan {self.plan_s_per_step:.4f}) | peak {self.peak_bytes / GiB:.2f} GiB | "
            f"streamed {self.streamed_bytes / 1e9:.2f} GB/step (plan {self.plan_streamed_bytes / 1e9:.2f}) | "
            f"torch {torch.__version__} | {platform.system()} {platform.machine()}"
        )


def synthetic_dit(kind: str = "tiny", layers: int = 2, seed: int = 0) -> MMDiT:
    """Random weights: "tiny" (TINY) or "full" (the 20B model's widths, `layers` blocks)."""
    torch.manual_seed(seed)
    config = MMDiTConfig(**TINY) if kind == "tiny" else MMDiTConfig(num_layers=layers)
    return MMDiT(config).eval()


def run(dit: MMDiT, what: str, device: torch.device, dtype: torch.dtype, width: int, height: int, steps: int,
        cfg: bool, card_name: str | None = None) -> BenchResult:  # fmt: skip
    """Time `steps` DiT passes (after one warm-up) at width x height and plan the same job for the card."""
    if steps < 1:
        raise ValueError(f"steps {steps}: time at least one step")
    if width % 16 or height % 16:
        raise ValueError(f"{width}x{height}: sides must be multiples of 16")
    c, batch = dit.config, 2 if cfg else 1
    g = torch.Generator().manual_seed(0)
    img = torch.randn(batch, c.out_channels, height // 8, width // 8, generator=g).to(device, dtype)  # [B, 16, h, w]
    txt = torch.randn(batch, TEXT_TOKENS, c.text_dim, generator=g).to(device, dtype)  # [B, T, text_dim]
    dit.to(device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.inference_mode():
        for i in range(steps + 1):
            t = torch.full((batch,), 1.0 - i / (steps + 1), device=device)
            start = time.perf_counter()
            dit(img, t, txt)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first pass warms up kernels and caches
                times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        card, free = detect_card(device), torch.cuda.mem_get_info(device)[0]
    else:
        card = CARDS[card_name or "24GB"]
        free = card.vram - (600 << 20)  # as bench/bench_offload.py: the CUDA context and a desktop take ~0.6 GiB
    workload = DiTWorkload(width, height, cfg=cfg)
    plan = plan_dit(dit, free, card, workload)
    name = f"{device}" + (f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    return BenchResult(
        what=what,
        device=name,
        dtype=str(dtype).removeprefix("torch."),
        workload=f"{width}x{height} {'CFG' if cfg else 'cfg 1'}",
        steps=steps,
        s_per_step=statistics.median(times),
        peak_bytes=peak,
        streamed_bytes=0,
        plan=plan.explain(),
        plan_s_per_step=plan.step_s,
        plan_streamed_bytes=plan.streamed_bytes,
    )


def load_for_bench(dit_path: Path | None, synthetic: str, layers: int) -> tuple[MMDiT, str]:
    if dit_path is not None:
        return load_dit(dit_path), dit_path.name
    return synthetic_dit(synthetic, layers), f"synthetic {synthetic}" + (
        f" ({layers} blocks)" if synthetic == "full" else ""
    )
