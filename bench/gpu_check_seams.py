"""gpu_check phases of issue 13's seams (bench/gpu_check.py runs them; split out to keep that file short):
  8 modulation         AdaLN modulation precomputed for 20 steps: equal forwards, bytes freed, precompute vs per step
  9 matmul             fp8 (_scaled_mm) and int8 (_int_mm) seams at the MLP shape: ms and error vs dequantised
 10 compile streamed   per-block compile (compiled.using) with 2 of 3 blocks streaming: equal, no recompiles
 11 norm and RoPE      QK-RMSNorm in bf16 (norms "compute") vs the float32 path, RoPE reading bf16: equal bits, ms
Each phase is `fn(c, e, h)`: c the gpu_check `Check`, e its result entry, h the module gpu_check_common (random_dit,
workload, plan_with, FP8).
"""

from __future__ import annotations

import time

import torch

from qwen_image_core import compiled as compiled_blocks
from qwen_image_core import matmul as MM
from qwen_image_core import modulation as M
from qwen_image_core import norms, rope
from qwen_image_core import offload as O
from qwen_image_core import offload_plan as P
from qwen_image_core.ops import Linear, set_packed
from qwen_image_core.quant_comfy import Int8
from qwen_image_core.transfer import default_transfer


def modulation_phase(c, e: dict, h) -> None:
    """Modulation precomputed for 20 steps: the same forward, bytes off each block, time against per-step."""
    model = h.random_dit(c, 2 if c.tiny else 6).to(c.device)
    img, t, txt, _ = h.workload(c, 1024, True)
    dt, rows, steps = img.dtype, img.shape[0], 20
    sigmas = torch.linspace(1.0, 0.05, steps)
    layers = [m for _, m in M.modulation_layers(model)]
    with torch.no_grad():
        sync = torch.cuda.synchronize if c.cuda else (lambda: None)
        t0 = time.perf_counter()
        table = M.precompute(model, sigmas, rows, dt, c.device)
        sync()
        e["precompute_ms"] = 1e3 * (time.perf_counter() - t0)
        silu = torch.randn(rows, model.config.hidden, device=c.device, dtype=dt)
        runs = dict(warmup=0, runs=1) if c.tiny else {}
        e["per_step_modulation_ms"] = 1e3 * c.timed(lambda: [m(silu) for m in layers], **runs)
        ok = True
        for k in (0, steps // 2):
            tk = torch.full((rows,), float(sigmas[k]), device=c.device)
            ok &= torch.equal(model(img, tk, txt, step_mod=table.steps[k]), model(img, tk, txt))
    c.verdict(e, "precomputed_equals_per_step", ok)
    c.verdict(e, "weights_read_once", set(table.reads.values()) == {1}, dict(list(table.reads.items())[:2]))
    sizes, _ = P.split_blocks(model, model.transformer_blocks)
    freed, _ = P.split_blocks(model, model.transformer_blocks, layers)
    e["block_mb"], e["block_mb_without_modulation"] = sizes[0] / 1e6, freed[0] / 1e6
    e["table_mb_per_step"] = table.nbytes / steps / 1e6
    e["steps_to_repay_precompute"] = e["precompute_ms"] / max(1e-9, e["per_step_modulation_ms"])


def matmul_phase(c, e: dict, h) -> None:
    """fp8 (_scaled_mm) and int8 (_int_mm) seams at the MLP shape: time and error against the dequantised GEMM."""
    k, n, m = (256, 512, 64) if c.tiny else (3072, 12288, 2 * 4096)
    dt = torch.bfloat16 if c.cuda else torch.float32
    g = torch.Generator(device=c.device).manual_seed(0)
    x = torch.randn(m, k, device=c.device, generator=g, dtype=dt)
    fp8 = Linear(k, n).to(c.device)
    fp8.weight.data = (torch.randn(n, k, device=c.device, generator=g) * 0.5).to(h.FP8)
    fp8.weight_scale = torch.tensor([0.02], device=c.device)
    int8 = Linear(k, n).to(c.device)
    q = torch.randint(-127, 128, (n, k), device=c.device, dtype=torch.int8, generator=g)
    set_packed(int8, q, Int8((n, k), convrot=256), {"weight_scale": torch.rand(n, device=c.device) * 1e-3 + 1e-4})
    e["fp8_native"] = MM.fp8_capable(x.device)
    for name, layer, mode in (("fp8", fp8, "fp8"), ("int8", int8, "int8")):
        layer.bias.data = layer.bias.data.to(dt)  # (the weight keeps its stored dtype)
        with torch.no_grad():
            off = layer(x)
            e[f"{name}_ms_dequantised"] = 1e3 * c.timed(lambda layer=layer: layer(x))
            with MM.using(layer, mode):
                y = layer(x)
                e[f"{name}_ms_native"] = 1e3 * c.timed(lambda layer=layer: layer(x))
        err = ((y.float() - off.float()).norm() / off.float().norm()).item()
        e[f"{name}_rel_error"] = err
        c.verdict(e, f"{name}_close_to_dequantised", err < (0.05 if name == "fp8" else 0.02), err)
    xq, xs = MM.quantize_rows_fp8(x)
    if e["fp8_native"]:
        nat = MM.fp8_mm(xq, xs, fp8.weight, fp8.weight_scale, dt, native=True).float()
        twin = MM.fp8_mm(xq, xs, fp8.weight, fp8.weight_scale, dt, native=False).float()
        d = ((nat - twin).norm() / twin.norm()).item()
        c.verdict(e, "fp8_native_equals_twin", d < 1e-2, d)


def compile_streamed(c, e: dict, h) -> None:
    """Per-block compile (compiled.using) with 2 of 3 blocks streaming: equal to eager, no recompiles."""
    import torch._dynamo  # noqa: PLC0415

    model = h.random_dit(c, 3)
    img, t, txt, lengths = h.workload(c, 1024, True)
    plan = h.plan_with(model, 1, 2)
    transfer = default_transfer(c.device)
    backend = "inductor" if c.cuda else "eager"  # inductor builds for about a minute on a small CPU
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad(), O.BlockStreamer(model, model.transformer_blocks, plan, transfer):
        ref = model(img, t, txt, txt_lengths=lengths)
        with compiled_blocks.using(model.transformer_blocks, backend):
            t0 = time.monotonic()
            out = model(img, t, txt, txt_lengths=lengths)
            e["first_pass_s"] = round(time.monotonic() - t0, 1)
            runs = dict(warmup=0, runs=1) if c.tiny else dict(warmup=1, runs=3)
            e["ms_compiled"] = 1e3 * c.timed(lambda: model(img, t, txt, txt_lengths=lengths), **runs)
        e["ms_eager"] = 1e3 * c.timed(lambda: model(img, t, txt, txt_lengths=lengths), **runs)
    diff = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6)).item()
    c.verdict(e, "compiled_streamed_matches", diff <= (1e-2 if c.cuda else 0.0), diff)
    c.verdict(e, "no_recompiles", not torch._dynamo.utils.counters["recompiles"],
              dict(torch._dynamo.utils.counters["stats"]))  # fmt: skip
    e["backend"] = backend


def norm_rope_phase(c, e: dict, h) -> None:
    """QK-RMSNorm in the compute dtype (`norms` "compute") against the float32 path, and RoPE reading bf16 against
    an upcast copy first, at the real q shape (both streams, CFG rows): equal bits? ms of each."""
    rows, n, heads, hd = (2, 80, 3, 32) if c.tiny else (2, 7145, 24, 128)
    g = torch.Generator(device=c.device).manual_seed(0)
    x = (3 * torch.randn(rows, n, heads, hd, device=c.device, generator=g)).to(torch.bfloat16)
    norm = norms.RMSNorm(hd, 1e-6).to(c.device)
    norm.weight.data = (1 + 0.3 * torch.randn(hd, device=c.device, generator=g)).to(torch.bfloat16)  # as stored
    with torch.no_grad():
        out = {}
        for precision in norms.PRECISIONS:
            norm.precision = precision
            out[precision] = norm(x)
            e[f"ms_norm_{precision}"] = 1e3 * c.timed(lambda: norm(x))
        c.verdict(e, "compute_norm_equals_float32_norm", torch.equal(out["compute"], out["float32"]))
        side = int(n**0.5)
        pos = torch.stack([torch.zeros(n), torch.arange(n) // side, torch.arange(n) % side], dim=-1).to(c.device)
        rot = rope.rope_table(pos, (hd // 8, 7 * hd // 16, 7 * hd // 16), 10000.0)
        e["ms_rope"] = 1e3 * c.timed(lambda: rope.apply_rope(x, rot))
        e["ms_rope_upcast_first"] = 1e3 * c.timed(lambda: rope.apply_rope(x.float(), rot).to(x.dtype))
        same = torch.equal(rope.apply_rope(x, rot), rope.apply_rope(x.float(), rot).to(x.dtype))
        c.verdict(e, "rope_in_bf16_equals_upcast_first", same)
