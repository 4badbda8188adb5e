"""bench/gpu_check.py phases on kernels and casts: 0 environment, 1 attention, 2 one block, 3 casts and syncs,
7 compile (see gpu_check.py for what each settles)."""

from __future__ import annotations

import contextlib
import platform
import time

import torch
import torch.nn.functional as F
from gpu_check_common import FP8, Check, config, count_syncs, random_dit, workload

from qwen_image_core import offload_plan as P
from qwen_image_core import rope
from qwen_image_core.attention import attention, per_row
from qwen_image_core.mmdit import DoubleStreamBlock
from qwen_image_core.ops import Linear, lora_to


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
