"""gpu_check phase 12: bench_step.py's per-component step model against the device.

The model (bench/step_count.py) says a block costs GEMM FLOPs / GEMM rate + attention FLOPs / attention rate +
memory bytes / DRAM rate. Here the four rates are measured on this device (a bf16 GEMM and a row-scaled fp8
`_scaled_mm` at the MLP shape, SDPA at the joint shape, a large device copy), the block is counted at the same
shape, and the model's milliseconds are set beside the block's measured ones for three configurations: default
(fp8 weights upcast), fp8 matmul, and fp8 matmul with the block compiled (inductor on CUDA; the "eager" backend
on tiny CPU runs, which only checks that the path runs). A GPU run tells whether the 4090 prediction can be
trusted: the model should land within 25 % of the measurement on each row.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import step_s  # noqa: E402
from step_count import count_our_block  # noqa: E402

from qwen_image_core import matmul as MM  # noqa: E402


def measured_rates(c, cfg, tokens: int, dt: torch.dtype) -> dict[str, float]:
    """FLOP/s of a bf16 GEMM and an fp8 row-scaled GEMM ([2 tokens, D] x [D, F]), of SDPA (2 rows, joint length),
    and bytes/s of a device copy, on this device."""
    m, k, n = 2 * tokens, cfg.hidden, cfg.mlp_dim
    g = torch.Generator(device=c.device).manual_seed(0)
    x, w = torch.randn(m, k, device=c.device, generator=g, dtype=dt), torch.randn(n, k, device=c.device, dtype=dt)
    rates = {"bf16 GEMM": 2 * m * k * n / c.timed(lambda: x @ w.t())}
    if MM.fp8_capable(x.device) and MM.native_dtype(x.device, dt):
        xq, xs = MM.quantize_rows_fp8(x)
        wq, ws = MM.quantize_rows_fp8(w)
        rates["fp8 GEMM"] = 2 * m * k * n / c.timed(lambda: MM.fp8_mm(xq, xs, wq, ws.reshape(-1), dt))
    else:
        rates["fp8 GEMM"] = rates["bf16 GEMM"]  # the twin: float GEMMs
    h, d = cfg.num_heads, cfg.head_dim
    q = torch.randn(2, h, tokens, d, device=c.device, dtype=dt)
    rates["attention"] = 4 * 2 * h * tokens * tokens * d / c.timed(lambda: F.scaled_dot_product_attention(q, q, q))
    big = torch.empty(64 << 20 if c.tiny else 1 << 30, dtype=torch.uint8, device=c.device)
    other = torch.empty_like(big)
    rates["memory"] = 2 * big.numel() / c.timed(lambda: other.copy_(big))
    return rates


def step_model(c, e: dict, h) -> None:
    """The three configurations' block time, measured and modelled with this device's rates."""
    cfg = h.config(c, 1)
    dt = torch.bfloat16 if c.cuda else torch.float32
    image, text = (64, 16) if c.tiny else (6889, 256)
    rates = measured_rates(c, cfg, image + text, dt)
    e["rates_T_per_s"] = {k: round(v / 1e12, 3) for k, v in rates.items()}
    block = h.random_dit(c, 1).transformer_blocks[0].to(c.device)
    g = torch.Generator(device=c.device).manual_seed(1)
    img, txt = (torch.randn(2, n, cfg.hidden, device=c.device, generator=g, dtype=dt) for n in (image, text))
    temb = torch.randn(2, cfg.hidden, device=c.device, generator=g, dtype=dt)
    pe = torch.randn(image + text, cfg.head_dim // 2, 2, 2, device=c.device, generator=g)
    mod = (torch.randn(2, 6 * cfg.hidden, device=c.device, generator=g, dtype=dt) * 0.1,) * 2
    backend = "inductor" if c.cuda else "eager"
    rows = {}
    with torch.no_grad():
        for name, mode, compiled in (("default", "off", False), ("fp8", "fp8", False), ("fp8_compiled", "fp8", True)):
            with MM.using(block, mode):
                fn = torch.compile(block.forward, backend=backend, dynamic=False) if compiled else block.forward
                ms = 1e3 * c.timed(lambda fn=fn: fn(img, txt, temb, pe, None, None, mod=mod))
            count = count_our_block(cfg, image, text, mode)
            if compiled:  # the compiled model: the fused kernels' traffic is known only from bench_step (CPU codegen)
                count.memory = count.operands
            rows[name] = (ms, 1e3 * step_s(count, rates, blocks=1))
            e[f"{name}_ms_measured"], e[f"{name}_ms_modelled"] = round(ms, 3), round(rows[name][1], 3)
    if c.cuda:
        for name, (ms, model) in rows.items():
            c.verdict(e, f"{name}_model_within_25pct", abs(model / ms - 1) <= 0.25, f"model/measured {model / ms:.2f}")
