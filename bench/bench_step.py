"""One DiT step on an RTX 4090, component by component, ours against ComfyUI's, anchored on ComfyUI's timings.

bench_offload.py's time model charges every FLOP at one end-to-end efficiency (50 % MFU), so it cannot tell two
implementations of the same FLOPs apart: fusing the element-wise work or dropping a copy changes nothing there.
Here one full-size block at 1328^2 with CFG (2 rows x (6,889 image + 256 text) tokens, fp8 weights, bf16 compute)
is counted (bench/step_count.py: GEMM and attention FLOPs, memory bytes, kernels), for ComfyUI 0.3.75's
QwenImageTransformerBlock and ours, eager and compiled. A step is 60 blocks:

    seconds = GEMM FLOPs / GEMM rate + attention FLOPs / attention rate + memory bytes / DRAM rate

with public 4090 rates (RATES). The absolute seconds are only as good as those rates, so the prediction is
anchored: ComfyUI's measured s/step on the same workload (anchors_performance A1, A2) times the ratio of our
modelled step to ComfyUI's modelled step on the same path (bf16 GEMMs: A1; fp8 GEMMs: A2). The FLOPs are the
same on both sides; the ratio carries what differs (memory traffic, kernels), and most of the rates' error cancels.

    .venv/bin/python bench/bench_step.py [--skip-compile]   (about 2 minutes on 2 CPU cores, 1.5 GB of memory;
                                                             ComfyUI from COMFYUI_DIR or .comfyui/ComfyUI)
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from step_count import Count, block_inputs, compiled_bytes, count_our_block, counting  # noqa: E402

from qwen_image_core import matmul  # noqa: E402
from qwen_image_core.mmdit import DoubleStreamBlock, MMDiTConfig  # noqa: E402
from qwen_image_core.ops import Linear  # noqa: E402
from tools.comfy_paths import import_comfy_for_oracle  # noqa: E402

ROWS, IMAGE, TEXT, BLOCKS, STEPS = 2, 6889, 256, 60, 20  # 1328^2, CFG: (1328 / 16)^2 image tokens, 256-token prompt

RATES = {  # RTX 4090, per second
    "bf16 GEMM": 150e12,  # torch bf16 matmul on a 4090: 151-165 TF at 2048-10240 squares (zzc0721/torch-
    #                       performance-test-data #78, torch 2.7); taken at 150 for these shapes
    "fp8 GEMM": 300e12,  # twice bf16: Ada's fp8 tensor peak at fp32 accumulate is 2x its bf16 one (330.3 / 165.2)
    "attention": 86e12,  # FlashAttention-2 forward on sm89 (PyTorch PR #192799's table, gpu_review.md 3.1)
    "memory": 0.9e12,  # bytes/s: achievable DRAM bandwidth of the 1.008 TB/s part (gpu_review.md 3.1)
}
PESSIMISTIC = {**RATES, "fp8 GEMM": 220e12, "attention": 70e12, "memory": 0.8e12}  # the sensitivity row
ANCHORS = {  # ComfyUI's measured seconds per step at 1328^2, CFG, 20 steps (anchors_performance.md)
    "A1": (
        71.0 / STEPS * 114 / 128,
        "template, 4090D, fp8 weights upcast, bf16 GEMMs: 71 s / 20 steps warm, TE and "
        "VAE included; x 114/128 SMs for a 4090",
    ),  # fmt: skip
    "A2": (1.99, "--fast fp8 matmul (fp8_e4m3fn_fast), a 24 GB Ada card (taken as a 4090): 1.99 s/it, #9190"),
}


def seconds(c: Count, rates: dict = RATES, blocks: int = BLOCKS) -> dict[str, float]:
    """Modelled seconds of `blocks` blocks (a step: 60) by component."""
    s = {k: blocks * v / rates[k] for k, v in c.gemm.items()}
    return {**s, "attention": blocks * c.attention / rates["attention"], "memory": blocks * c.memory / rates["memory"]}


def step_s(c: Count, rates: dict = RATES, blocks: int = BLOCKS) -> float:
    return sum(seconds(c, rates, blocks).values())


def inputs(cfg: MMDiTConfig, device: str = "meta", image: int = IMAGE, text: int = TEXT):
    """step_count.block_inputs at the bench's sizes (2 rows)."""
    return block_inputs(cfg, device, image, text, ROWS)


def ours(mode: str = "off") -> Count:
    """Our DoubleStreamBlock with fp8 weights, eager: the default path (weights upcast per layer) or a matmul mode;
    the modulation precomputed for the run as the pipelines and the bridge do."""
    return count_our_block(MMDiTConfig(), IMAGE, TEXT, mode, ROWS)


def comfyui(fast_fp8: bool) -> Count | None:
    """ComfyUI's QwenImageTransformerBlock with fp8 weights, eager: manual_cast (upcast per layer, bf16 GEMMs: A1's
    path) or fp8_ops (`--fast fp8_matrix_mult`: A2's path). None where ComfyUI cannot be imported."""
    try:
        import_comfy_for_oracle()
    except FileNotFoundError:
        return None
    import comfy.cli_args  # noqa: PLC0415

    comfy.cli_args.args.use_pytorch_cross_attention = True  # what ComfyUI runs on CUDA: SDPA
    import comfy.ops  # noqa: PLC0415
    from comfy.ldm.qwen_image.model import QwenImageTransformerBlock  # noqa: PLC0415

    cfg = MMDiTConfig()
    ops = comfy.ops.fp8_ops if fast_fp8 else comfy.ops.manual_cast
    block = QwenImageTransformerBlock(cfg.hidden, cfg.num_heads, cfg.head_dim, eps=1e-6, dtype=torch.bfloat16,
                                      device="meta", operations=ops).eval()  # fmt: skip
    for m in block.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
    img, txt, temb, _, _ = inputs(cfg)
    freqs = torch.empty(1, 1, IMAGE + TEXT, cfg.head_dim // 2, 2, 2, device="meta")
    c = Count()
    with counting(c):
        block(img, txt, None, temb, freqs)
    return c


def fp8_block(cfg: MMDiTConfig) -> DoubleStreamBlock:
    """A DoubleStreamBlock with random fp8 weights (bf16 elsewhere), on the CPU."""
    torch.manual_seed(0)
    block = DoubleStreamBlock(cfg).to(torch.bfloat16)
    for m in block.modules():
        if isinstance(m, Linear):
            m.weight.data = (m.weight.data.float() * 0.02).to(torch.float8_e4m3fn)
    return block


def compiled_block(cfg: MMDiTConfig, image: int, text: int, mode: str = "fp8") -> tuple[int, int]:
    """Our block compiled by inductor on the CPU at `image` + `text` tokens: (fused-kernel bytes, fused kernels)."""
    block = fp8_block(cfg)
    img, txt, temb, pe, mod = inputs(cfg, "cpu", image, text)
    with matmul.using(block, mode):
        return compiled_bytes(block.forward, img, txt, temb, pe, None, None, mod=mod)


def compiled(mode: str = "fp8") -> Count:
    """Our block compiled, at the real size: the fused kernels' bytes measured at 128 + 16, 256 + 16 and 128 + 32
    tokens and extended linearly (element-wise traffic is linear in the tokens); FLOPs as eager."""
    cfg = MMDiTConfig(num_layers=1)
    (b0, k0), (b1, _), (b2, _) = (compiled_block(cfg, n, m, mode) for n, m in ((128, 16), (256, 16), (128, 32)))
    eager = ours(mode)
    memory = b0 + (b1 - b0) / 128 * (IMAGE - 128) + (b2 - b0) / 16 * (TEXT - 16)
    return replace(eager, memory=memory, kernels=k0 + eager.extern, by_op=Counter())


def row(name: str, c: Count) -> str:
    s = seconds(c)
    gemm = sum(v for k, v in s.items() if "GEMM" in k)
    return (f"{name:<46}{BLOCKS * sum(c.gemm.values()) / 1e12:>8.1f}{gemm:>7.2f}{s['attention']:>7.2f}"
            f"{BLOCKS * c.memory / 1e9:>8.0f}{s['memory']:>7.2f}{BLOCKS * c.kernels:>8d}{step_s(c):>8.2f}")  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-compile", action="store_true", help="leave out the compiled block (2 minutes)")
    args = ap.parse_args(argv)
    print(f"One DiT step at 1328^2 with CFG ({ROWS} rows x {IMAGE} + {TEXT} tokens), fp8 weights, bf16 compute;")
    print("RTX 4090 rates: " + ", ".join(f"{k} {v / 1e12:.2f} T/s" for k, v in RATES.items()) + " (bytes)")
    print()
    head = f"{'one step (60 blocks)':<46}{'GEMM TF':>8}{'GEMM s':>7}{'attn s':>7}{'mem GB':>8}{'mem s':>7}"
    print(head + f"{'kernels':>8}{'model s':>8}")
    print("-" * (len(head) + 16))
    comfy = {"A1": comfyui(False), "A2": comfyui(True)}
    if comfy["A1"] is not None:
        print(row("ComfyUI 0.3.75, manual_cast (A1's path)", comfy["A1"]))
        print(row("ComfyUI 0.3.75, fp8_ops (A2's path)", comfy["A2"]))
    cases = {"ours, default (fp8 upcast, bf16 GEMMs)": ("A1", ours()), "ours, fp8 matmul": ("A2", ours("fp8"))}
    if not args.skip_compile:
        cases["ours, fp8 matmul, compiled"] = ("A2", compiled("fp8"))
    for name, (_, c) in cases.items():
        print(row(name, c))
    print("(memory: eager, every non-view op's tensors in and out; compiled: inductor's fused kernels, CPU codegen)")
    print()
    if comfy["A1"] is None:
        print("ComfyUI not found (set COMFYUI_DIR): no anchored prediction")
        return
    print(f"Predicted s/step, {STEPS} steps: modelled | anchored = ComfyUI's measured x (ours / ComfyUI's, modelled)")
    print(f"  {'':<42}{'model':>7}{'x20':>7}   anchor       ratio   s/step    x20   pessimistic rates x20")
    for name, (anchor, c) in cases.items():
        measured, ratio = ANCHORS[anchor][0], step_s(c) / step_s(comfy[anchor])
        low = step_s(c, PESSIMISTIC) / step_s(comfy[anchor], PESSIMISTIC) * measured
        print(f"  {name:<42}{step_s(c):>7.2f}{STEPS * step_s(c):>7.1f}   {anchor} {measured:.2f} s  x {ratio:.3f}"
              f"{measured * ratio:>9.2f}{STEPS * measured * ratio:>7.1f}   model {STEPS * step_s(c, PESSIMISTIC):.1f},"
              f" anchored {STEPS * low:.1f}")  # fmt: skip
    for anchor, (_, what) in ANCHORS.items():
        print(f"  {anchor}: {what}")
    print(f"  pessimistic: {', '.join(f'{k} {v / 1e12:.2f}' for k, v in PESSIMISTIC.items() if v != RATES[k])}")
    check = step_s(comfy["A1"]) / step_s(comfy["A2"])
    print(f"  check: modelled ComfyUI A1 / A2 = {check:.2f}, measured {ANCHORS['A1'][0] / ANCHORS['A2'][0]:.2f} (A1 "
          "includes the text encoder and the VAE, and was a 4090D)")  # fmt: skip
    print()
    print("Eager memory traffic by op, GB per step: ours default | ComfyUI manual_cast | ours fp8 | ComfyUI fp8_ops")
    a, b, f, g = cases["ours, default (fp8 upcast, bf16 GEMMs)"][1].by_op, comfy["A1"].by_op, cases[
        "ours, fp8 matmul"][1].by_op, comfy["A2"].by_op  # fmt: skip
    for op in sorted(set(a) | set(b) | set(f) | set(g), key=lambda o: -(a[o] + b[o] + f[o] + g[o]))[:14]:
        print(f"  {op:<24}" + "".join(f"{BLOCKS * x[op] / 1e9:>9.1f}" for x in (a, b, f, g)))


if __name__ == "__main__":
    main()
