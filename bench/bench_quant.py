"""Dequantisation throughput of the packed weight formats: GB/s of stored weight bytes turned into compute-dtype
weights at the cast, and bytes per parameter, as a table.

GGUF: every type of the published Qwen-Image GGUFs (`quant_gguf`), on one weight of the real model's shape
(an MLP layer, [12288, 3072] by default) filled with valid random blocks; the time of `GGUFQuant.dequantize`
(median of the repeats) to float32 and to bf16. With the `gguf` package installed, its numpy dequantiser (the
reference, host only) is timed too for comparison.

comfy_quant: every format of ComfyUI's quantised layers (`quant_comfy`), on a weight of the same shape
quantised by comfy-kitchen's own quantisers (the file writers of `tools/checkpoints/comfy_quant.py`; needs
comfy-kitchen, else skipped); stored bytes count the scales too. `--only gguf|comfy_quant` runs one table.

    .venv/bin/python bench/bench_quant.py [--device cpu|cuda] [--rows 12288] [--cols 3072] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_image_core import quant_gguf as Q  # noqa: E402


def random_packed(t: Q.GGMLType, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Valid random blocks [rows, bytes per row]: random bits, finite float16 scales."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (rows * cols // t.block, t.nbytes), generator=g, dtype=torch.uint8)
    if t.plain is not None:
        values = (torch.randn(blocks.shape[0], generator=g) * 0.02).to(t.plain)
        return values.view(torch.uint8).reshape(rows, -1)
    for name in Q.HALF_FIELDS:
        if name in t.fields:
            o, _ = t.fields[name]
            half = (torch.rand(blocks.shape[0], 1, generator=g) * 1e-3).to(torch.float16)
            blocks[:, o : o + 2] = half.view(torch.uint8)
    return blocks.reshape(rows, -1)


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up (allocations, kernels)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=12288)
    ap.add_argument("--cols", type=int, default=3072)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["gguf", "comfy_quant"], default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's); 1 on a busy machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        import gguf  # noqa: PLC0415  (optional: the reference's speed for comparison)
    except ImportError:
        gguf = None
    params = args.rows * args.cols
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if args.only != "gguf":
        comfy_quant_table(args, device, sync, name)
    if args.only == "comfy_quant":
        return
    print(f"GGUF dequantisation on {name}: one [{args.rows}, {args.cols}] weight ({params / 1e6:.1f} M parameters)")
    print("GB/s = stored (packed) bytes per second; Gparam/s = weights produced per second")
    head = f"{'type':<6}{'bytes/param':>12}{'MB stored':>11}{'-> fp32 GB/s':>14}{'Gparam/s':>10}{'-> bf16 GB/s':>14}"
    head += f"{'gguf numpy GB/s':>17}" if gguf is not None and device.type == "cpu" else ""
    print(head)
    print("-" * len(head))
    for t in Q.TYPES.values():
        packed = random_packed(t, args.rows, args.cols).to(device)
        quant = Q.GGUFQuant(t, (args.rows, args.cols))
        nbytes = packed.numel()
        f32 = timed(lambda q=quant, p=packed: q.dequantize(p, {}, torch.float32), args.repeats, sync)
        bf16 = timed(lambda q=quant, p=packed: q.dequantize(p, {}, torch.bfloat16), args.repeats, sync)

        def rate(seconds, dtype, t=t, per=nbytes):  # a type already in the dtype is a view: no work to time
            return f"{'view':>14}" if t.plain == dtype else f"{per / seconds / 1e9:>14.2f}"

        row = f"{t.name:<6}{t.bytes_per_value:>12.4f}{nbytes / 1e6:>11.1f}{rate(f32, torch.float32)}"
        row += f"{'-' if t.plain == torch.float32 else f'{params / f32 / 1e9:.2f}':>10}{rate(bf16, torch.bfloat16)}"
        if gguf is not None and device.type == "cpu":
            raw, qtype = np.ascontiguousarray(packed.numpy()), gguf.GGMLQuantizationType[t.name]
            ref = timed(lambda r=raw, q=qtype: gguf.quants.dequantize(r, q), max(1, args.repeats // 2), sync)
            row += f"{'view' if t.plain == torch.float32 else f'{nbytes / ref / 1e9:.2f}':>17}"
        print(row)
        del packed


def comfy_quant_table(args, device: torch.device, sync, name: str) -> None:
    """The comfy_quant formats: bytes per parameter (scales included) and dequantisation GB/s to fp32 / bf16."""
    try:
        from qwen_image_core.formats import comfy_quant as F  # noqa: PLC0415
        from tools.checkpoints import comfy_quant as C  # noqa: PLC0415  (comfy-kitchen's quantisers)
    except ImportError as e:
        print(f"comfy_quant: skipped ({e})")
        return
    rows, cols = args.rows, args.cols
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) / cols**0.5
    print(f"comfy_quant dequantisation on {name}: one [{rows}, {cols}] weight ({rows * cols / 1e6:.1f} M parameters)")
    head = f"{'format':<16}{'bytes/param':>12}{'MB stored':>11}{'-> fp32 GB/s':>14}{'Gparam/s':>10}{'-> bf16 GB/s':>14}"
    print(head)
    print("-" * len(head))
    for fmt in C.FORMATS:
        tensors, conf = C.quantise(fmt, w)
        stored = {f"w.{k}": v for k, v in tensors.items()}
        _, packed = F.split("bench", stored, {"w": F.parse_marker(conf, "bench")})
        data, quant, extras = packed["w.weight"]
        data, extras = data.to(device), {k: v.to(device) for k, v in extras.items()}
        nbytes = sum(t.numel() * t.element_size() for t in (data, *extras.values()))
        f32 = timed(lambda q=quant, p=data, e=extras: q.dequantize(p, e, torch.float32), args.repeats, sync)
        bf16 = timed(lambda q=quant, p=data, e=extras: q.dequantize(p, e, torch.bfloat16), args.repeats, sync)
        row = f"{fmt:<16}{nbytes / (rows * cols):>12.4f}{nbytes / 1e6:>11.1f}{nbytes / f32 / 1e9:>14.2f}"
        print(row + f"{rows * cols / f32 / 1e9:>10.2f}{nbytes / bf16 / 1e9:>14.2f}")
    print()


if __name__ == "__main__":
    main()
