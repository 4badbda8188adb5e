"""Benchmark: one sampling step with and without an InstantX ControlNet on this CPU; prints one table.

A random DiT of `--blocks` full-width blocks (3072 wide, as the real model) and a ControlNet of `--net-blocks`
blocks (the real Union has 5 against 60; the default 1 against 2 fits 8 GB of float32), float32, on a
`--size` x `--size` latent with a prompt of `--text` tokens, true CFG (cond and uncond in one batched pass; the
ControlNet runs on the positive prompt only, as diffusers does). Each row is the median of `--repeats`
interleaved runs of one denoiser call (`pipeline.sample`'s CFG denoiser, with `control.ControlledDenoiser` for
the ControlNet row).

    .venv/bin/python bench/bench_controlnet.py [--blocks 2] [--net-blocks 1] [--size 32] [--text 32] [--repeats 3]

Then (or alone, with --plans-only) the joint offload plan of the real 20B DiT and the real InstantX Union (5 bf16
blocks) per card at 1328x1328 with CFG (`control_offload.plan_controlled`; weightless models on the meta device):
where each model's blocks live and what streams per step. Predictions of the planner, not measurements.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_image_core import offload_plan as P  # noqa: E402
from qwen_image_core import sampling  # noqa: E402
from qwen_image_core.control import Control, ControlledDenoiser  # noqa: E402
from qwen_image_core.control_offload import plan_controlled  # noqa: E402
from qwen_image_core.controlnet import InstantXControlNet  # noqa: E402
from qwen_image_core.mmdit import MMDiT  # noqa: E402
from qwen_image_core.pipeline import _velocity  # noqa: E402
from tools.checkpoints import controlnet as C  # noqa: E402
from tools.checkpoints import dit as D  # noqa: E402


def plan_table() -> None:
    """The joint DiT + ControlNet plan per card (the README's VRAM table's settings: VRAM - 0.6 GB, 1 GB reserve)."""
    from qwen_image_core.mmdit import MMDiTConfig  # noqa: PLC0415

    with torch.device("meta"):
        net = InstantXControlNet(MMDiTConfig(num_layers=5)).to(torch.bfloat16)
    print("| card | DiT | DiT resident (of 60) | ControlNet resident (of 5) | streamed per step | est. exposed s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for storage in ("fp8", "bf16"):
        dit = D.meta_model(storage)
        for card in P.CARDS.values():
            free = card.vram - int(0.6 * P.GB)
            plan = plan_controlled(dit, [net], free, card, P.DiTWorkload())
            cn, dt = plan.parts
            print(f"| {card.name} | {storage} | {len(plan.resident(dt))} | {len(plan.resident(cn))} | "
                  f"{plan.plan.streamed_bytes / P.GB:.1f} GB | {plan.plan.exposed_s:.2f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--net-blocks", type=int, default=1)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--text", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plans-only", action="store_true", help="only the joint plan table (no CPU timing)")
    a = ap.parse_args()
    if a.plans_only:
        plan_table()
        return
    torch.set_num_threads(a.threads)
    cfg, net_cfg = D.config(num_layers=a.blocks), D.config(num_layers=a.net_blocks)
    dit = MMDiT(cfg)
    dit.load_state_dict(D.state_dict(cfg), assign=True)
    net = InstantXControlNet(net_cfg)
    net.load_state_dict(C.state_dict(net_cfg), assign=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, a.size, a.size, generator=g)
    cond, uncond = torch.randn(1, a.text, 3584, generator=g), torch.randn(1, a.text, 3584, generator=g)
    sigmas = torch.tensor([0.8, 0.4, 0.0])
    plain = sampling.CFGDenoiser(_velocity(dit, torch.float32, None), 4.0, "norm")
    control = Control(net, torch.randn(1, 16, a.size, a.size, generator=g), 1.0)
    controlled = ControlledDenoiser(plain, [control], sigmas, a.blocks)
    rows = {"step without ControlNet": plain, "step with one ControlNet": controlled}
    times = {k: [] for k in rows}
    with torch.no_grad():
        for d in rows.values():  # warm-up
            d(x, sigmas[:1], cond, uncond)
        for _ in range(a.repeats):
            for name, d in rows.items():
                t = time.perf_counter()
                d(x, sigmas[:1], cond, uncond)
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["step without ControlNet"])
    print(f"DiT {a.blocks} x 3072-wide blocks, ControlNet {a.net_blocks} blocks, latent {a.size}x{a.size}, "
          f"text {a.text}, CFG batched, float32, {a.threads} threads")  # fmt: skip
    print(f"| {'row':<28} | {'median s':>9} | {'ratio':>6} |")
    print(f"| {'-' * 28} | {'-' * 9} | {'-' * 6} |")
    for name in rows:
        m = statistics.median(times[name])
        print(f"| {name:<28} | {m:9.3f} | {m / base:6.2f} |")
    print()
    plan_table()


if __name__ == "__main__":
    main()
