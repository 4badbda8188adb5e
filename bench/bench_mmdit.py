"""Benchmark of the MMDiT on this CPU; prints two tables.

1. Forward time, ours vs diffusers' QwenImageTransformer2DModel vs ComfyUI 0.3.75's native model, at a fixed
   mid-size configuration: 4 full-width blocks, a 512x512 image (64x64 latent, 1024 tokens), 64 text tokens,
   float32 weights and compute. The three models share one in-memory float32 state dict (assigned, not
   copied: ~5.5 GB, so peak RSS ~6.4 GB) and their runs are interleaved, so machine noise hits all three.
2. Peak RSS while loading a synthetic full-width float8 (e4m3fn) ComfyUI file of 8 blocks, against its size,
   measured in a fresh subprocess for each way of holding weights: copied into memory (the default) and
   `mmap=True` (nothing read at load): after `load_dit` and after touching every weight once (what a first
   forward does).

    .venv/bin/python bench/bench_mmdit.py [--repeats 3] [--blocks 4] [--skip-forward] [--skip-load]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_image_core.mmdit import MMDiT, MMDiTConfig, load_dit, patchify, unpatchify  # noqa: E402
from tools.checkpoints import dit as W  # noqa: E402


def ours(sd, cfg):
    with torch.device("meta"):
        m = MMDiT(cfg)
    m.load_state_dict(sd, strict=True, assign=True)
    return m.requires_grad_(False)


def diffusers_model(sd, cfg):
    from accelerate import init_empty_weights  # keeps the RoPE tables (plain tensors) real
    from diffusers import QwenImageTransformer2DModel

    with init_empty_weights():
        m = QwenImageTransformer2DModel(num_layers=cfg.num_layers)
    m.load_state_dict(sd, strict=True, assign=True)
    return m.requires_grad_(False)


def comfy_model(sd, cfg):
    from tools.comfy_paths import import_comfy_for_oracle

    import_comfy_for_oracle()
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    with torch.device("meta"):
        m = QwenImageTransformer2DModel(num_layers=cfg.num_layers, operations=comfy.ops.disable_weight_init)
    m.load_state_dict(sd, strict=True, assign=True)
    return m.requires_grad_(False)


def bench_forward(blocks: int, repeats: int) -> list[tuple[str, float, float, float, float]]:
    """(name, best wall s, median wall s, best CPU s, max |out - ours|) per implementation.

    Runs are interleaved (order rotated each round) so that load from other processes hits all three; process
    CPU time (all threads) is reported too, as it is less sensitive to that load than wall time.
    """
    cfg = MMDiTConfig(num_layers=blocks)
    print(f"building a random float32 state dict of {blocks} full-width blocks ...", flush=True)
    sd = W.state_dict(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    img, txt, sigma = (
        torch.randn(1, 16, 64, 64, generator=g),
        torch.randn(1, 64, 3584, generator=g),
        torch.tensor([0.7]),
    )
    tokens, grid = patchify(img, 2)

    def run_diffusers(m):
        out = m(tokens, txt, timestep=sigma, img_shapes=[[(1, *grid)]], return_dict=False)[0]
        return unpatchify(out, grid, 2, img.shape[-2:])

    runs = {  # the three models share the state dict's tensors (assigned), so memory holds the weights once
        "ours (qwen_image_core)": (ours(sd, cfg), lambda m: m(img, sigma, txt)),
        "diffusers 0.42.1": (diffusers_model(sd, cfg), run_diffusers),
        "ComfyUI 0.3.75 native": (comfy_model(sd, cfg), lambda m: m(img[:, :, None], sigma, txt)[:, :, 0]),
    }
    times = {name: [] for name in runs}  # (wall s, process CPU s) per run
    outs = {}
    with torch.inference_mode():
        for name, (m, call) in runs.items():  # warm-up, and the outputs to compare
            outs[name] = call(m)
        names = list(runs)
        for r in range(repeats):
            for name in names[r % 3 :] + names[: r % 3]:  # rotate the order: no implementation always runs first
                m, call = runs[name]
                t, c = time.perf_counter(), time.process_time()
                call(m)
                times[name].append((time.perf_counter() - t, time.process_time() - c))
                print(f"  {name}: wall {times[name][-1][0]:.2f} s, CPU {times[name][-1][1]:.2f} s", flush=True)
    ref = outs["ours (qwen_image_core)"]
    rows = [
        (
            n,
            min(w for w, _ in ts),
            statistics.median(w for w, _ in ts),
            min(c for _, c in ts),
            (outs[n] - ref).abs().max().item(),
        )
        for n, ts in times.items()
    ]
    del runs, sd, outs
    gc.collect()
    return rows


def rss(field: str) -> int:
    """VmRSS (current) or VmHWM (peak) of this process in bytes; VmHWM starts afresh at exec (ru_maxrss does not)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def load_child(path: str, mmap: bool = False) -> None:
    """Runs in a fresh process: RSS before, after load_dit (weights copied, or mapped), after touching every weight."""
    base = rss("VmRSS")
    t = time.perf_counter()
    model = load_dit(path, mmap=mmap)
    load_time = time.perf_counter() - t
    after_load = rss("VmRSS")
    peak_load = rss("VmHWM")
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    touched = 0.0
    for p in model.parameters():  # read every byte, as the first forward does, one tensor at a time
        touched += float(p.view(torch.uint8).reshape(-1)[::4096].sum())
    after_touch = rss("VmRSS")
    peak = rss("VmHWM")
    out = dict(base=base, after_load=after_load, peak_load=peak_load, after_touch=after_touch, peak=peak)
    print(json.dumps({**out, "load_time": load_time, "dtypes": dtypes}))


def bench_load(blocks: int) -> dict[str, dict]:
    cfg = MMDiTConfig(num_layers=blocks)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"qwen_image_{blocks}blocks_fp8_e4m3fn.safetensors"
        print(f"writing a synthetic {blocks}-block full-width fp8 file ...", flush=True)
        write_fast_fp8(path, cfg)
        size = path.stat().st_size
        out = {}
        for mode, extra in (("copied (default)", []), ("mmap=True", ["--mmap"])):
            cmd = [sys.executable, __file__, "--load-child", str(path), *extra]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[mode] = {**json.loads(res.stdout.strip().splitlines()[-1]), "size": size}
        return out


def write_fast_fp8(path: Path, cfg: MMDiTConfig) -> None:
    """Like W.write_fp8, but the float8 bytes come from one reused random pool (values do not matter here)."""
    pool = torch.randint(0, 0x70, (64 << 20,), dtype=torch.uint8).view(torch.float8_e4m3fn)  # finite values

    def fp8_bytes(shape):
        n = shape[0] * shape[1]
        return pool.repeat(-(-n // pool.numel()))[:n].reshape(shape)

    entries = []
    for k, s in W.shapes(cfg).items():
        if W.is_linear_weight(k, s):
            entries.append((k, s, torch.float8_e4m3fn, lambda s=s: fp8_bytes(s)))
        else:
            entries.append((k, s, torch.bfloat16, lambda k=k, s=s: W.random_tensor(k, s, 0)))
    W.write_safetensors(path, entries)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--load-blocks", type=int, default=8)
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--load-child")
    ap.add_argument("--mmap", action="store_true", help="with --load-child: map the file instead of copying")
    a = ap.parse_args()
    if a.load_child:
        return load_child(a.load_child, a.mmap)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not a.skip_forward:
        rows = bench_forward(a.blocks, a.repeats)
        print(f"\nForward, {a.blocks} full-width blocks, 512x512 (1024 image tokens), 64 text tokens, float32, CPU")
        print(
            f"| implementation | wall, best of {a.repeats} (s) | wall, median (s) | CPU, best (s) | CPU vs ours ",
            end="",
        )
        print("| max abs diff to ours |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, best, med, cpu, diff in rows:
            print(f"| {name} | {best:.2f} | {med:.2f} | {cpu:.2f} | {cpu / rows[0][3]:.2f}x | {diff:.2e} |")
    if not a.skip_load:
        runs = bench_load(a.load_blocks)
        gb = 1 << 30
        size = next(iter(runs.values()))["size"]
        print(f"\nLoading a full-width fp8 (e4m3fn) file of {a.load_blocks} blocks: {size / gb:.2f} GiB")
        print("| weights | measure | RSS (GiB) | x file size |")
        print("| --- | --- | --- | --- |")
        for mode, r in runs.items():
            for label, key in [
                ("process after imports", "base"),
                ("after load_dit (peak)", "peak_load"),
                ("after touching every weight (peak)", "peak"),
            ]:
                print(f"| {mode} | {label} | {r[key] / gb:.2f} | {r[key] / r['size']:.2f} |")
            print(f"{mode}: load_dit time {r['load_time']:.2f} s; parameter dtypes {r['dtypes']}")


if __name__ == "__main__":
    main()
