"""bench/step_count.py and bench/bench_step.py: the counts are the block's real FLOPs and bytes.

The meta-device counts (no memory, no arithmetic) must give the analytic FLOPs of costs.dit_block_flops for our
block and ComfyUI's alike, count fp8 GEMMs as fp8, and charge the fp8 activation quantiser its two passes; the
compiled count must read inductor's fused kernels (fewer kernels, fewer bytes than eager). The full-size compiled
row runs in the bench itself (2 minutes), not here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_step as B  # noqa: E402
from step_count import Count, counting  # noqa: E402

from qwen_image_core import matmul as MM  # noqa: E402
from qwen_image_core.costs import DiTWorkload, dit_block_flops  # noqa: E402
from qwen_image_core.mmdit import MMDiTConfig  # noqa: E402
from tools.checkpoints.dit import meta_model  # noqa: E402

WL = DiTWorkload(1328, 1328, cfg=True, text_tokens=B.TEXT)
needs_cxx = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("gcc") is None, reason="inductor needs a C++ compiler on CPU"
)


def analytic() -> tuple[float, float]:
    """(linear, attention) FLOPs of one block at the bench's workload, modulation left out (precomputed)."""
    cfg = MMDiTConfig()
    n, d = WL.tokens, cfg.hidden
    attention = WL.rows * 4 * n * n * d
    mod = WL.rows * 2 * 2 * 6 * d * d
    return dit_block_flops(WL, d, cfg.mlp_dim) - attention - mod, attention


def test_our_block_counts_the_analytic_flops_and_fp8_gemms_as_fp8():
    linear, attention = analytic()
    default, fp8 = B.ours(), B.ours("fp8")
    assert sum(default.gemm.values()) == pytest.approx(linear, rel=1e-9) and set(default.gemm) == {"bf16 GEMM"}
    assert fp8.gemm["fp8 GEMM"] == pytest.approx(linear, rel=1e-9) and set(fp8.gemm) == {"fp8 GEMM"}
    assert default.attention == attention == fp8.attention
    assert default.extern == fp8.extern == 12 + 1  # 12 linear layers, one attention call
    # the upcast path casts each fp8 weight to bf16 (read 1, write 2 bytes per parameter), the fp8 path does not
    block = meta_model("fp8").transformer_blocks[0]
    weights = sum(m.weight.numel() for n, m in block.named_modules() if isinstance(m, MM.Linear) and "_mod" not in n)
    assert default.by_op["_to_copy"] >= 3 * weights * 0.99


def test_comfyui_block_counts_the_same_flops():
    """In a subprocess: the bench sets ComfyUI's attention choice (SDPA, its CUDA path) before importing it."""
    code = (
        "import json, sys; sys.path.insert(0, 'bench'); import bench_step as B; "
        "print(json.dumps([[dict(c.gemm), c.attention] for c in (B.comfyui(False), B.comfyui(True))]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (slow, slow_attn), (fast, fast_attn) = json.loads(out.stdout.strip().splitlines()[-1])
    linear, attention = analytic()
    # ComfyUI computes the modulation inside the block (2 rows x two 3072 -> 18432 layers): the rest is equal
    mod = 2 * 2 * (2 * 3072 * 6 * 3072)
    assert set(slow) == {"bf16 GEMM"} and set(fast) == {"fp8 GEMM"}
    assert slow["bf16 GEMM"] == pytest.approx(linear + mod, rel=1e-9) == fast["fp8 GEMM"]
    assert slow_attn == fast_attn == attention


def test_the_fp8_activation_quantiser_costs_two_passes():
    """13 bytes per bf16 element: the row maxima (read 2), x / scale to float32 (read 2, write 4), the cast
    (read 4, write 1); the scales are noise."""
    x = torch.empty(4096, 3072, dtype=torch.bfloat16, device="meta")
    c = Count()
    with counting(c):
        MM.quantize_rows_fp8(x)
    assert c.memory == pytest.approx(13 * x.numel(), rel=1e-3) and c.kernels <= 6


@needs_cxx
def test_compiled_count_reads_inductors_fused_kernels():
    """A small block (real code, tiny widths) compiled by inductor: its fused kernels move fewer bytes in fewer
    kernels than the eager ops, and the bytes grow with the tokens."""
    cfg = MMDiTConfig(num_layers=1, num_heads=2, head_dim=32, mlp_dim=256, text_dim=64, rope_axes=(4, 14, 14))
    small, large = B.compiled_block(cfg, 32, 8), B.compiled_block(cfg, 64, 8)
    img, txt, temb, pe, mod = B.inputs(cfg, "meta", 32, 8)
    block = B.DoubleStreamBlock(cfg).to(torch.bfloat16).to("meta")
    for m in block.modules():
        if isinstance(m, MM.Linear):
            m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
    eager = Count()
    with MM.using(block, "fp8"), counting(eager):
        block(img, txt, temb, pe, None, None, mod=mod)
    assert 0 < small[0] < large[0] and 0 < small[0] < eager.memory
    assert 0 < small[1] < eager.kernels - eager.extern


@needs_cxx
def test_fp8_matmul_blocks_compiled_by_inductor_equal_eager():
    """The configuration bench_step predicts for (fp8 matmul, blocks compiled): inductor's code gives the eager
    numbers (to its reordering of float32 sums and one bf16 rounding)."""
    cfg = MMDiTConfig(num_layers=1, num_heads=2, head_dim=32, mlp_dim=256, text_dim=64, rope_axes=(4, 14, 14))
    block = B.fp8_block(cfg)
    args = B.inputs(cfg, "cpu", 48, 8)
    img, txt, temb, pe, mod = (t / 4 if isinstance(t, torch.Tensor) else t for t in args)
    torch._dynamo.reset()
    with torch.no_grad(), MM.using(block, "fp8") as n:
        eager = block(img, txt, temb, pe, None, None, mod=mod)
        compiled = torch.compile(block.forward, dynamic=False)(img, txt, temb, pe, None, None, mod=mod)
    assert n == 14  # 12 in the block's path, 2 modulation layers (precomputed here)
    for e, c in zip(eager, compiled, strict=True):
        assert torch.isfinite(e).all() and (c.float() - e.float()).norm() / e.float().norm() < 1e-2  # measured 2.8e-3
