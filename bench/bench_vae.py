"""VAE benchmark on this machine at the real config (random weights): ours (2D) vs diffusers and ComfyUI (3D).

    .venv/bin/python bench/bench_vae.py               # the table: encode/decode 512² and 1024², time and RSS
    .venv/bin/python bench/bench_vae.py --calibrate   # working bytes per pixel for vae_tiling.BYTES_PER_PIXEL
    .venv/bin/python bench/bench_vae.py --rgba        # only the RGBA (Qwen-Image-Layered VAE) decode 1024² rows

Each measurement runs in a fresh subprocess: load the model, warm up at 64², reset the peak-RSS mark
(/proc/self/clear_refs), run once. "work" is peak RSS minus RSS before the run (activations only);
"peak" is the process's whole peak RSS (torch + weights + activations). A watchdog stops any run whose
RSS passes --cap (default 6.5 GB, the memory share of this shared machine) and reports it as over the cap.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss() -> tuple[int, int]:
    """(current, peak) resident set size in bytes."""
    status = Path("/proc/self/status").read_text().split("\n")
    get = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status if line.startswith(("VmRSS", "VmHWM"))}
    return get["VmRSS"], get["VmHWM"]


def build(impl: str, folder: Path):
    """(encode(images [1,3,H,W]) -> latents, decode(latents) -> images) for one implementation; "-rgba" names
    the 4-channel Qwen-Image-Layered VAE (ours-rgba, diffusers-rgba)."""
    from safetensors.torch import load_file

    if impl.endswith("-rgba"):
        impl, folder = impl.removesuffix("-rgba"), folder / "rgba"

    if impl.startswith("ours"):
        from qwen_image_core.formats.vae import load_vae

        vae = load_vae(folder / "comfy" / "qwen_image_vae.safetensors")
        tile = None if impl == "ours" else False  # "ours-untiled" never tiles
        return (lambda x: vae.encode(x, tile=tile, budget=1 << 40), lambda z: vae.decode(z, tile=tile, budget=1 << 40))
    if impl == "diffusers":
        from diffusers import AutoencoderKLQwenImage

        with torch.device("meta"):
            model = AutoencoderKLQwenImage(input_channels=4 if folder.name == "rgba" else 3)
        sd = load_file(str(folder / "diffusers" / "vae" / "diffusion_pytorch_model.safetensors"))
        model.load_state_dict(sd, assign=True)
        return (
            lambda x: model.encode(x[:, :, None]).latent_dist.mode(),
            lambda z: model.decode(z[:, :, None]).sample,
        )
    if impl == "comfy":
        from tools.comfy_paths import import_comfy_for_oracle

        import_comfy_for_oracle()
        from comfy.ldm.wan.vae import WanVAE

        with torch.device("meta"):
            model = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True])  # fmt: skip
        model.load_state_dict(load_file(str(folder / "comfy" / "qwen_image_vae.safetensors")), assign=True)
        return (lambda x: model.encode(x[:, :, None]), lambda z: model.decode(z[:, :, None]))
    raise ValueError(impl)


def one(impl: str, op: str, size: int, folder: Path, tile: str | None) -> dict:
    """Run one measurement in this process; returns seconds and bytes."""
    torch.manual_seed(0)
    encode, decode = build(impl, folder)
    if tile:
        from qwen_image_core.formats.vae import load_vae
        from qwen_image_core.vae_tiling import Tiling

        vae = load_vae(folder / "comfy" / "qwen_image_vae.safetensors")
        budget = int(float(tile) * (1 << 30)) if tile[0].isdigit() else None
        forced = None if budget else Tiling(*map(int, tile.split("/")))
        encode = lambda x: vae.encode(x, tile=forced, budget=budget)  # noqa: E731
        decode = lambda z: vae.decode(z, tile=forced, budget=budget)  # noqa: E731
    fn = encode if op == "encode" else decode
    channels = 4 if impl.endswith("-rgba") else 3
    make = (
        (lambda s: torch.rand(1, channels, s, s) * 2 - 1)
        if op == "encode"
        else (lambda s: torch.randn(1, 16, s // 8, s // 8))
    )
    with torch.no_grad():
        fn(make(64))  # warm-up: oneDNN primitives, lazy imports
        x = make(size)
        before, _ = rss()
        Path("/proc/self/clear_refs").write_text("5")  # reset the VmHWM peak mark
        t, cpu = time.perf_counter(), time.process_time()
        fn(x)
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    _, peak = rss()
    return {"seconds": seconds, "cpu": cpu, "work": peak - before, "peak": peak}


def measure(impl: str, op: str, size: int, folder: Path, cap: float, tile: str | None = None, threads: int = 0) -> dict:
    """One measurement in a subprocess under an RSS watchdog."""
    cmd = [sys.executable, __file__, "--one", impl, op, str(size), str(folder), "--threads", str(threads)]
    cmd += ["--tile", tile] if tile else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            kb = next(int(line.split()[1]) for line in status.read_text().split("\n") if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            kb = 0
        if kb * 1024 > cap:
            proc.kill()
            proc.wait()
            return {"over": cap}
        time.sleep(0.05)
    out = proc.stdout.read().strip().split("\n")[-1]
    return json.loads(out)


def write_weights(folder: Path) -> None:
    from tools.checkpoints.vae import write_vae

    write_vae(folder / "comfy", "comfy", dtype=torch.float32)
    write_vae(folder / "diffusers", "diffusers", dtype=torch.float32)
    write_vae(folder / "rgba" / "comfy", "comfy", image_channels=4, dtype=torch.float32)  # Qwen-Image-Layered's
    write_vae(folder / "rgba" / "diffusers", "diffusers", image_channels=4, dtype=torch.float32)


def rgba_rows(folder: Path, cap: float, threads: int) -> None:
    """The RGBA VAE (qwen_image_layered_vae, 4 image channels) decoding 1024²: ours (2D) vs diffusers (3D)."""
    ours = None
    for impl in ("ours-rgba", "diffusers-rgba"):
        r = measure(impl, "decode", 1024, folder, cap, threads=threads)
        if "over" in r:
            print(f"| decode RGBA | 1024² | {impl} | stopped | | > {gb(cap)} RSS | | | | |", flush=True)
            continue
        ours = ours or r
        ratios = (r["seconds"] / ours["seconds"], r["cpu"] / ours["cpu"], r["work"] / ours["work"])
        rel = " | ".join(f"{v:.1f}x" for v in ratios)
        row = f"| decode RGBA | 1024² | {impl} | {r['seconds']:.1f} | {r['cpu']:.1f} | {gb(r['work'])} |"
        print(f"{row} {gb(r['peak'])} | {rel} |", flush=True)


def gb(n: float) -> str:
    return f"{n / (1 << 30):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=4, metavar=("IMPL", "OP", "SIZE", "FOLDER"))
    ap.add_argument("--tile", help="for --one: a budget in GiB ('1.0') or a forced 'size/overlap'")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--cap", type=float, default=6.5, help="GiB of RSS above which a run is stopped")
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--impls", default="ours,diffusers,comfy")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: torch's default)")
    ap.add_argument("--no-tiled", action="store_true", help="skip the tiled 2048² decode row")
    ap.add_argument("--rgba", action="store_true", help="only the RGBA (layered VAE) decode 1024² rows")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        impl, op, size, folder = args.one
        print(json.dumps(one(impl, op, int(size), Path(folder), args.tile)))
        return
    cap = args.cap * (1 << 30)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, float32, batch 1")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_weights(folder)
        if args.calibrate:  # work = fixed + slope * pixels, fitted over three sizes
            print("| op | size | work GiB | work / pixel / dtype byte |")
            print("|---|---|---|---|")
            for op in ("encode", "decode"):
                sizes, works = (256, 512, 768), []
                for size in sizes:
                    works.append(measure("ours-untiled", op, size, folder, cap)["work"])
                    print(f"| {op} | {size}² | {gb(works[-1])} | {works[-1] / size**2 / 4:.0f} |", flush=True)
                px = [s * s for s in sizes]
                mx, my = sum(px) / 3, sum(works) / 3
                slope = sum((a - mx) * (b - my) for a, b in zip(px, works, strict=True)) / sum(
                    (a - mx) ** 2 for a in px
                )
                print(f"{op}: slope {slope / 4:.0f} bytes / pixel / dtype byte, fixed {gb(my - slope * mx)} GiB")
            return
        print(
            "| op | size | impl | seconds | CPU s | work GiB | peak RSS GiB | time / ours | CPU / ours | work / ours |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        rgba_rows(folder, cap, args.threads)
        if args.rgba:
            return
        for op in ("decode", "encode"):
            for size in map(int, args.sizes.split(",")):
                ours = None
                for impl in args.impls.split(","):
                    r = measure(impl, op, size, folder, cap, threads=args.threads)
                    if "over" in r:
                        print(f"| {op} | {size}² | {impl} | stopped | | > {gb(cap)} RSS | | | | |", flush=True)
                        continue
                    ours = ours or r
                    ratios = (r["seconds"] / ours["seconds"], r["cpu"] / ours["cpu"], r["work"] / ours["work"])
                    rel = " | ".join(f"{v:.1f}x" for v in ratios)
                    row = f"| {op} | {size}² | {impl} | {r['seconds']:.1f} | {r['cpu']:.1f} | {gb(r['work'])} |"
                    print(f"{row} {gb(r['peak'])} | {rel} |", flush=True)
        for tile in (
            () if args.no_tiled else ("0.5",)
        ):  # auto tiling under a 0.5 GiB budget: 512² tiles overlapping by 128
            r = measure("ours", "decode", 2048, folder, cap, tile=tile, threads=args.threads)
            label = f"ours tiled ({'budget ' + tile + ' GiB' if '/' not in tile else 'forced ' + tile})"
            if "over" in r:
                print(f"| decode | 2048² | {label} | stopped | | > {gb(cap)} RSS | | | | |", flush=True)
            else:
                row = f"| decode | 2048² | {label} | {r['seconds']:.1f} | {r['cpu']:.1f} | {gb(r['work'])} |"
                print(f"{row} {gb(r['peak'])} | | | |", flush=True)


if __name__ == "__main__":
    main()
