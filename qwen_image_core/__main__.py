"""Command line: headless text-to-image and editing to PNG, without ComfyUI.

    python -m qwen_image_core generate --repo Qwen-Image/ --prompt "a cat" --out cat.png
    python -m qwen_image_core generate --dit qwen_image_fp8_e4m3fn.safetensors --vae qwen_image_vae.safetensors \\
        --text-encoder qwen_2.5_vl_7b_fp8_scaled.safetensors --tokenizer tokenizer/ --prompt "a cat" --out cat.png
    python -m qwen_image_core edit --repo Qwen-Image-Edit-2509/ --image a.png --image b.png --prompt "..." --out e.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .bench import load_for_bench, run
from .costs import CARDS
from .formats.vae import load_vae
from .lora import load_lora
from .mmdit import load_dit
from .pipeline import QwenImagePipeline
from .text_encoder import load_text_encoder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _schedule(text: str):
    if text in ("dynamic", "lightning"):
        return text
    if "," in text:
        return [float(v) for v in text.split(",")]
    return float(text)


def _lora(text: str) -> tuple[str, float]:
    path, _, strength = text.rpartition(":")
    return (path, float(strength)) if path and strength.replace(".", "", 1).lstrip("-").isdigit() else (text, 1.0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m qwen_image_core", description="Qwen-Image text-to-image and editing")
    sub = ap.add_subparsers(dest="job", required=True)
    for job in ("generate", "edit"):
        p = sub.add_parser(job)
        src = p.add_argument_group("weights (a diffusers repo folder, or the three files)")
        src.add_argument("--repo", type=Path, help="diffusers folder of Qwen/Qwen-Image*")
        src.add_argument("--dit", type=Path, help="diffusion model file or transformer/ folder")
        src.add_argument("--vae", type=Path, help="VAE file or vae/ folder")
        src.add_argument("--text-encoder", type=Path, help="Qwen2.5-VL file or text_encoder/ folder")
        src.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: found next to the weights)")
        p.add_argument("--prompt", required=True)
        p.add_argument("--negative", default=" ", help="negative prompt (true CFG runs when --cfg > 1)")
        p.add_argument("--width", type=int)
        p.add_argument("--height", type=int)
        p.add_argument("--steps", type=int, default=50)
        p.add_argument("--cfg", type=float, default=4.0, help="true-CFG scale; 1 disables the negative pass")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--schedule",
            type=_schedule,
            default="dynamic",
            help="'dynamic' (official), 'lightning', a fixed shift such as 3.1, or comma-separated sigmas",
        )
        p.add_argument("--lora", type=_lora, action="append", default=[], help="LoRA file[:strength], repeatable")
        p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default bf16 on GPU, fp32 on CPU)")
        p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
        p.add_argument("--batch-size", type=int, default=1)
        p.add_argument("--out", type=Path, required=True, help="PNG path; with a batch, _N is added")
        if job == "generate":
            p.add_argument("--image", type=Path, help="img2img start image")
            p.add_argument(
                "--strength", type=float, default=0.6, help="img2img: share of the schedule run (1 = ignore the image)"
            )
        else:
            p.add_argument("--image", type=Path, action="append", required=True, help="reference image, repeatable")
            p.add_argument("--variant", choices=("edit", "edit_plus"), default="edit_plus")
            p.add_argument(
                "--resize",
                choices=("official", "keep"),
                default="official",
                help="'keep' preserves the reference's size (no shift/zoom)",
            )
    b = sub.add_parser("bench", help="time a few DiT steps here, beside the planner's prediction")
    b.add_argument("--dit", type=Path, help="your diffusion model file (default: synthetic random weights)")
    b.add_argument("--synthetic", choices=("tiny", "full"), default="tiny", help="without --dit: toy or 20B widths")
    b.add_argument("--layers", type=int, default=2, help="--synthetic full: blocks to build (the real model has 60)")
    b.add_argument("--width", type=int, default=256)
    b.add_argument("--height", type=int, default=256)
    b.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up")
    b.add_argument("--cfg", type=float, default=4.0, help="> 1: cond and uncond batched (CFG), 1: cond only")
    b.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default bf16 on GPU, fp32 on CPU)")
    b.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    b.add_argument("--card", choices=sorted(CARDS), default="24GB", help="the card to plan for without CUDA")
    return ap


def bench(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    dit, what = load_for_bench(args.dit, args.synthetic, args.layers)
    res = run(dit, what, device, dtype, args.width, args.height, args.steps, args.cfg > 1, args.card)
    print(res.table())
    print()
    print("paste into an issue:")
    print(res.issue_line())
    return 0


def load_pipeline(args) -> QwenImagePipeline:
    if args.repo:
        return QwenImagePipeline.from_folder(args.repo, tokenizer=args.tokenizer)
    missing = [n for n in ("dit", "vae", "text_encoder") if getattr(args, n) is None]
    if missing:
        raise SystemExit(f"give --repo, or all of --dit --vae --text-encoder (missing: {', '.join(missing)})")
    te = load_text_encoder(args.text_encoder, tokenizer=args.tokenizer)
    return QwenImagePipeline(load_dit(args.dit), load_vae(args.vae), te)


def save_pngs(images: torch.Tensor, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = (
        [out] if images.shape[0] == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    )
    for img, path in zip(images, paths, strict=True):
        arr = (img.movedim(0, -1).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.job == "bench":
        return bench(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    t0 = time.monotonic()
    pipe = load_pipeline(args)
    pipe.dit.to(device)
    pipe.vae.to(device)
    if pipe.text_encoder is not None:
        pipe.text_encoder.model.to(device)
    loras = [(load_lora(path, pipe.dit), strength) for path, strength in args.lora]
    negative = args.negative if args.cfg > 1 else None

    def progress(i, n, x, x0):
        print(f"\rstep {i + 1}/{n}", end="", file=sys.stderr, flush=True)

    common = dict(
        negative_prompt=negative,
        steps=args.steps,
        cfg_scale=args.cfg,
        seed=args.seed,
        schedule=args.schedule,
        batch_size=args.batch_size,
        callback=progress,
        loras=loras,
        dtype=dtype,
    )
    if args.job == "generate":
        start = Image.open(args.image).convert("RGB") if args.image else None
        images = pipe.generate(
            args.prompt,
            width=args.width or 1024,
            height=args.height or 1024,
            image=start,
            strength=args.strength,
            **common,
        )
    else:
        refs = [Image.open(p).convert("RGB") for p in args.image]
        images = pipe.edit(
            args.prompt, refs, variant=args.variant, resize=args.resize, width=args.width, height=args.height, **common
        )
    print(file=sys.stderr)
    for path in save_pngs(images, args.out):
        print(f"wrote {path} ({images.shape[-1]}x{images.shape[-2]}, {time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
